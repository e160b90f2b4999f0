"""argparse types for numeric flags: a zero or negative count, a share outside (0, 1] or a malformed list is a
usage error (exit 2, the flag named) before anything runs, never a silent default or a traceback later."""

from __future__ import annotations

import argparse
import math


def _number(kind: type, text: str) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and math.isnan(value):
        raise argparse.ArgumentTypeError("NaN is not allowed")
    return value


def positive_int(text: str) -> int:
    v = _number(int, text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return v


def nonneg_int(text: str) -> int:
    v = _number(int, text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0")
    return v


def positive_float(text: str) -> float:
    v = _number(float, text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return v


def nonneg_float(text: str) -> float:
    v = _number(float, text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return v


def share(text: str) -> float:
    """A fraction in (0, 1]."""
    v = _number(float, text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in (0, 1]")
    return v


def positive_int_list(text: str) -> list[int]:
    """"1024,4096" -> [1024, 4096]: positive integers, no empty item."""
    return [positive_int(v.strip()) for v in text.split(",")]


def writable_dir(path: str, flag: str) -> str:
    """Create `path` if needed and check it is writable, before a run whose results go there (so a bad path costs
    nothing): a clear error naming the flag otherwise."""
    import os
    from pathlib import Path

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create it ({err.strerror or err})") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {path}: not writable")
    return path
