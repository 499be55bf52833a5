"""Argparse types for numbers, shared by the CLI and the benchmarks: a bad value is refused with one
line (`argument --top-k: must be >= 1, got 0`) before any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["NON_NEGATIVE", "POSITIVE", "POSITIVE_FLOAT", "Parser", "at_least"]


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


_positive_float.__name__ = "number > 0"
POSITIVE, NON_NEGATIVE, POSITIVE_FLOAT = at_least(1), at_least(0), _positive_float


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are ONE line on stderr (exit 2), with where to read more,
    instead of the usage block and then the reason. Subcommand parsers are of the same class."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
