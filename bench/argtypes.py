"""Parsers of setting values, shared by the command line and run configuration files."""

from __future__ import annotations

import argparse
import math


def key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value


def at_least(minimum: int, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)


def positive_seconds(text: str) -> float:
    value = at_least(0, float)(text)
    if not 0 < value < math.inf:  # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"must be a number of seconds more than 0, got {text}")
    return value
