"""Argument types for the ``orthoknee`` command: each refuses a value outside its range at
parse time, with the option and the allowed range in one line, before any work starts.

Why here and not in the engine: the engine checks its inputs too (a Python caller gets an
OrthoKneeError), but a typo on the command line should cost nothing, not the minutes a
feature cache or a training run takes to reach the check.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn

__all__ = [
    "OneLineParser",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "fraction",
    "open_fraction",
    "probability",
    "int_at_least",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ("orthoknee predict: --steps: ... ") and exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")
        sys.exit(2)


def _number(kind: Callable[[str], float], text: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(_number(int, text))
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1]: 0 would leave nothing."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def open_fraction(text: str) -> float:
    """A share in [0, 1): 1 would leave nothing for the rest."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def value_name(text: str) -> tuple[int, str]:
    """VALUE=NAME: a label value (1-255) and the structure's name."""
    value, sep, name = text.partition("=")
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not sep or not name.strip() or not 1 <= number <= 255:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not VALUE=NAME with a label value 1-255, e.g. '35=Patellar ligament'"
        )
    return number, name.strip()
