"""Run settings from a file: ``bench run --config run.yaml`` (YAML or JSON).

The file holds the settings of ``bench run`` under the names a run's manifest records them
(``suite``, ``policy``, ``policy_args``, ``tasks``, ``episodes_per_task``, ...), so a run's
``manifest.json`` is itself a configuration file: ``bench run --config
results/<run>/manifest.json --out results/again`` runs the same episodes again. Values are
checked by the same parsers as the command line's flags, and a bad one is named with its file
and key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from bench.argtypes import NON_NEGATIVE, POSITIVE, positive_seconds
from bench.plan import parse_index_list


def _text(value) -> str:
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {value}")
    return str(value)


def _indices(what: str):
    def parse(value):
        if isinstance(value, list):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise ValueError(f"expected a list of {what} indices, got {value!r}")
            value = ",".join(map(str, value))
        elif not isinstance(value, str):
            raise ValueError(f"expected a list like [0, 3] or text like '0,3,5-7', got {value!r}")
        return parse_index_list(value, what)
    return parse


def _name(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a name, got {value!r}")
    return value


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _option_text(value) -> str:
    """A policy option as it would be written on the command line (``cuda_graphs=false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"expected a text, number or true/false, got {value!r}")


def _policy_args(value) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of option names to values, got {value!r}")
    return {str(key): _option_text(option) for key, option in value.items()}


SETTINGS = {
    "suite": _name,
    "policy": _name,
    "policy_args": _policy_args,
    "tasks": _indices("task"),
    "episodes_per_task": lambda v: POSITIVE(_text(v)),
    "init_states": _indices("init state"),
    "seed": lambda v: int(_text(v)),
    "chunk_length": lambda v: POSITIVE(_text(v)),
    "max_steps": lambda v: POSITIVE(_text(v)),
    "camera_size": lambda v: POSITIVE(_text(v)),
    "watchdog_s": lambda v: positive_seconds(_text(v)),
    "video": _flag,
    "workers": lambda v: POSITIVE(_text(v)),
    "max_batch": lambda v: NON_NEGATIVE(_text(v)),
}


def read_config_file(path: str | Path) -> dict:
    """The settings a file gives (null values are not given), checked and converted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"config file {path} does not parse: {error}") from None
    if isinstance(data, dict) and "format" in data and isinstance(data.get("config"), dict):
        data = data["config"]  # a run's manifest: its configuration
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, holds {type(data).__name__}")
    settings = {}
    for key, value in data.items():
        if key not in SETTINGS:
            raise ValueError(f"config file {path}: unknown setting {key!r}; settings: {', '.join(SETTINGS)}")
        if value is None:
            continue
        try:
            settings[key] = SETTINGS[key](value)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"config file {path}: {key}: {error}") from None
    return settings
