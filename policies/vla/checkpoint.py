"""OpenVLA-OFT checkpoint directories: load and save, from local files only.

Layout: ``config.json``, ``preprocessor_config.json``, ``model.safetensors.index.json`` with
sharded ``model-*.safetensors`` (or one ``model.safetensors``), ``dataset_statistics.json``,
``tokenizer.model``, ``action_head--*_checkpoint.pt`` and ``proprio_projector--*_checkpoint.pt``
(state dicts, possibly with DDP's ``module.`` prefix). timm's LayerScale ``gamma`` is stored
as ``scale_factor`` (transformers renames parameters called gamma). Nothing is fetched,
no remote code runs, and every missing, unexpected or mis-shaped tensor is an error
naming it: a model is never partly random. A Hugging Face Hub repository id stands for its
snapshot in the local Hub cache (``hub.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from policies.vla.config import VLAConfig, read_config, read_json
from policies.vla.hub import HubCacheError, cached_snapshot, hub_repo_id
from policies.vla.model import OFTModel
from policies.vla.tokenizer import SENTENCEPIECE_FILE as TOKENIZER_FILE

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
STATS_FILE = "dataset_statistics.json"
SEPARATE_PARTS = ("action_head", "proprio_projector")  # saved as .pt files beside the safetensors


class CheckpointError(ValueError):
    pass


def to_checkpoint_key(name: str) -> str:
    return re.sub(r"\.(ls[12])\.gamma$", r".\1.scale_factor", name)


def to_model_key(name: str) -> str:
    return re.sub(r"\.(ls[12])\.scale_factor$", r".\1.gamma", name)


@dataclass
class Checkpoint:
    model: OFTModel
    config: VLAConfig
    norm_stats: dict  # unnorm_key -> {"action": {...}, "proprio": {...}}
    directory: Path
    identity: dict


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _unreadable_is_an_error(path: Path, read, *args, **kwargs):
    """``read(*args)``; a damaged file (truncated, not what its name says) is an error naming it."""
    try:
        return read(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the readers raise many types for a bad file
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index_path, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index_path.is_file():
        weight_map = read_json(index_path, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"checkpoint {directory}: missing {INDEX_FILE} (or {SINGLE_FILE})")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: missing weight file {name} named by {INDEX_FILE}")
        for key, tensor in _unreadable_is_an_error(path, load_file, str(path)).items():
            if weight_map is not None and weight_map.get(key) != name:
                raise CheckpointError(f"{path}: tensor {key!r} is not listed for this file in {INDEX_FILE}")
            tensors[key] = tensor
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"checkpoint {directory}: {INDEX_FILE} lists tensors no file holds: {_describe(absent)}")
    return tensors


def find_part_file(directory: Path, part: str) -> Path:
    found = sorted(directory.glob(f"{part}--*checkpoint.pt"))
    if not found:
        raise CheckpointError(f"checkpoint {directory}: missing {part}--*_checkpoint.pt")
    if len(found) > 1:
        raise CheckpointError(
            f"checkpoint {directory}: several {part} files ({', '.join(p.name for p in found)}); keep one"
        )
    return found[0]


def read_part(directory: Path, part: str) -> dict[str, torch.Tensor]:
    path = find_part_file(directory, part)
    state = _unreadable_is_an_error(path, torch.load, path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_norm_stats(directory: Path, config: VLAConfig) -> dict:
    path = directory / STATS_FILE
    if path.is_file():
        stats = read_json(path, CheckpointError)
    elif config.extra.get("norm_stats"):
        stats = config.extra["norm_stats"]
    else:
        raise CheckpointError(f"checkpoint {directory}: missing {STATS_FILE} (and config.json has no norm_stats)")
    for key, entry in stats.items():
        for part in ("action", "proprio"):
            if part not in entry or "q01" not in entry[part] or "q99" not in entry[part]:
                raise CheckpointError(f"{STATS_FILE}: entry {key!r} has no {part} q01/q99")
    return stats


def check_state(model: OFTModel, state: dict[str, torch.Tensor], directory: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_describe([to_checkpoint_key(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {_describe([to_checkpoint_key(k) for k in unexpected])}")
    wrong = [k for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        problems.append("wrong shapes: " + "; ".join(
            f"{to_checkpoint_key(k)!r} is {tuple(state[k].shape)}, the model needs {tuple(expected[k])}" for k in wrong[:5]
        ) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config.json: " + "; ".join(problems))


SAMPLED_BYTES = 1 << 20  # of each end of a large file, for its identity


def checkpoint_identity(directory: Path) -> dict:
    """Hashes of the small files whole and of the large ones' first and last MiB, with every
    file's size (hashing 15 GB per run is too slow). Checkpoints of one architecture have
    weight files of equal sizes and headers, so the sampled weights tell them apart."""
    digest = hashlib.sha256()
    files = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        size = path.stat().st_size
        files[path.name] = size
        digest.update(path.name.encode() + str(size).encode())
        with open(path, "rb") as f:
            if size <= 2 * SAMPLED_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(SAMPLED_BYTES))
                f.seek(size - SAMPLED_BYTES)
                digest.update(f.read())
    return {"path": str(directory), "digest": digest.hexdigest()[:16], "files": files}


def load_checkpoint(directory: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Checkpoint:
    directory, hub = locate_checkpoint(directory)
    config = read_config(directory)
    norm_stats = read_norm_stats(directory, config)
    state = {to_model_key(k): v for k, v in read_safetensors(directory).items()}
    for part in SEPARATE_PARTS:
        clashing = [k for k in state if k.startswith(part + ".")]
        if clashing:
            raise CheckpointError(f"checkpoint {directory}: unexpected tensors {_describe(clashing)} in the safetensors")
        state.update({f"{part}.{k}": v for k, v in read_part(directory, part).items()})
    with torch.device("meta"):
        model = OFTModel(config)
    check_state(model, state, directory)
    model.load_state_dict(state, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    identity = checkpoint_identity(directory)
    if hub:
        identity["hub"] = hub
    return Checkpoint(model, config, norm_stats, directory, identity)


def locate_checkpoint(name: Path | str) -> tuple[Path, dict | None]:
    """The checkpoint directory ``name`` means, and the Hub repository and commit when it is a
    repository id found in the local Hub cache (None for a directory)."""
    directory = Path(name).expanduser()
    if directory.is_dir():
        return directory, None
    repo_id = hub_repo_id(str(name))
    if repo_id is None or directory.exists():
        raise CheckpointError(f"checkpoint directory {name} does not exist")
    try:
        return cached_snapshot(*repo_id)
    except HubCacheError as exc:
        raise CheckpointError(str(exc)) from None


def save_checkpoint(model: OFTModel, directory: Path | str, norm_stats: dict, step: int = 0,
                    tokenizer_file: Path | None = None, shard_bytes: int = 2 * 1024 ** 3,
                    dtype: torch.dtype | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or ``state``, a state dict of it) in the OpenVLA-OFT layout (what
    ``load_checkpoint`` reads back)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_json_dict(), indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(model.config.preprocessor_json_dict(), indent=2))
    (directory / STATS_FILE).write_text(json.dumps(norm_stats, indent=2))
    if tokenizer_file is not None:
        (directory / TOKENIZER_FILE).write_bytes(Path(tokenizer_file).read_bytes())

    def prepared(t: torch.Tensor) -> torch.Tensor:
        return (t.to(dtype) if dtype is not None else t).detach().cpu().contiguous()

    main, parts = {}, {p: {} for p in SEPARATE_PARTS}
    for key, tensor in (model.state_dict() if state is None else state).items():
        part = key.split(".", 1)[0]
        if part in parts:
            parts[part][key.split(".", 1)[1]] = prepared(tensor)
        else:
            main[to_checkpoint_key(key)] = prepared(tensor)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in main.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in main.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for part, state in parts.items():
        torch.save(state, directory / f"{part}--{step}_checkpoint.pt")
    return directory
