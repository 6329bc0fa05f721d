"""The goal of a LIBERO task, read from its BDDL file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Predicates the expert can achieve, with their arity.
SUPPORTED = {"on": 2, "in": 2, "open": 1, "close": 1, "turnon": 1, "turnoff": 1}


class UnsupportedGoalError(ValueError):
    pass


@dataclass(frozen=True)
class Predicate:
    name: str  # lower case: on, in, open, close, turnon, turnoff
    args: tuple[str, ...]


def _tokens(text: str) -> list[str]:
    text = re.sub(r";[^\n]*", "", text)  # BDDL comments
    return re.findall(r"\(|\)|[^\s()]+", text)


def _parse_sexpr(tokens: list[str], pos: int):
    if tokens[pos] != "(":
        return tokens[pos], pos + 1
    items, pos = [], pos + 1
    while tokens[pos] != ")":
        item, pos = _parse_sexpr(tokens, pos)
        items.append(item)
    return items, pos + 1


def parse_goal(bddl_text: str) -> list[Predicate]:
    """The conjunction of atomic predicates in ``(:goal (And ...))``.

    Anything the expert cannot achieve (disjunctions, negations, unknown predicates) is an
    error naming it, so no task is attempted with a goal that was silently misread.
    """
    tokens = _tokens(bddl_text)
    try:
        start = next(i for i in range(len(tokens) - 1) if tokens[i] == "(" and tokens[i + 1].lower() == ":goal")
    except StopIteration:
        raise UnsupportedGoalError("the BDDL text has no (:goal ...) section") from None
    goal, _ = _parse_sexpr(tokens, start)
    body = goal[1]
    conjuncts = body[1:] if isinstance(body, list) and str(body[0]).lower() == "and" else [body]
    predicates = []
    for atom in conjuncts:
        if not isinstance(atom, list) or not atom or isinstance(atom[0], list):
            raise UnsupportedGoalError(f"goal term {atom!r} is not an atomic predicate")
        name, args = atom[0].lower(), tuple(atom[1:])
        if name not in SUPPORTED:
            supported = ", ".join(SUPPORTED)
            raise UnsupportedGoalError(f"goal predicate {atom[0]!r} is not supported; supported: {supported}")
        if len(args) != SUPPORTED[name] or any(isinstance(a, list) for a in args):
            raise UnsupportedGoalError(f"goal predicate {atom[0]!r} takes {SUPPORTED[name]} names, got {args!r}")
        predicates.append(Predicate(name, args))
    return predicates


def read_goal(bddl_file: str | Path) -> list[Predicate]:
    return parse_goal(Path(bddl_file).read_text())
