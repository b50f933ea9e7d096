"""Field validators for the frozen config dataclasses of every layer: one set, one message style.

Each check names the field as `<owner>.<field>` (owner: the dataclass's `PREFIX` when it has one,
e.g. "rl" for a training-config section, else its class name) and raises the caller's error class,
so a model config raises ConfigError and a training config TrainConfigError with the same wording:

    check_int(self, "steps", 0, error=TrainConfigError)   # "rl.steps: must be >= 0, got -1"
"""

from __future__ import annotations

import math
from typing import Any


def field_name(obj: Any, name: str) -> str:
    return f"{getattr(obj, 'PREFIX', type(obj).__name__)}.{name}"


def require(cond: bool, name: str, msg: str, *, error: type[Exception] = ValueError) -> None:
    if not cond:
        raise error(f"{name}: {msg}")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def check_int(obj, name: str, lo: int | None = None, hi: int | None = None, *, error: type[Exception]) -> None:
    v, dotted = getattr(obj, name), field_name(obj, name)
    require(is_int(v), dotted, f"must be an int, got {v!r}", error=error)
    if lo is not None:
        require(v >= lo, dotted, f"must be >= {lo}, got {v}", error=error)
    if hi is not None:
        require(v <= hi, dotted, f"must be <= {hi}, got {v}", error=error)


def check_positive_ints(obj, *names: str, error: type[Exception]) -> None:
    for name in names:
        v = getattr(obj, name)
        require(is_int(v) and v > 0, field_name(obj, name), f"must be a positive int, got {v!r}", error=error)


def check_float(obj, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, error: type[Exception]) -> None:
    """A finite number in [lo, hi] (open ends with lo_open / hi_open), stored back as a float."""
    v, dotted = getattr(obj, name), field_name(obj, name)
    require(is_number(v), dotted, f"must be a finite number, got {v!r}", error=error)
    object.__setattr__(obj, name, float(v))
    if lo is not None:
        require(v > lo if lo_open else v >= lo, dotted, f"must be {'>' if lo_open else '>='} {lo}, got {v}",
                error=error)
    if hi is not None:
        require(v < hi if hi_open else v <= hi, dotted, f"must be {'<' if hi_open else '<='} {hi}, got {v}",
                error=error)


def check_choice(obj, name: str, allowed: tuple[str, ...], *, error: type[Exception]) -> None:
    v = getattr(obj, name)
    require(v in allowed, field_name(obj, name), f"must be one of {list(allowed)}, got {v!r}", error=error)


def check_bool(obj, *names: str, error: type[Exception]) -> None:
    for name in names:
        v = getattr(obj, name)
        require(isinstance(v, bool), field_name(obj, name), f"must be true or false, got {v!r}", error=error)


def check_str(obj, name: str, *, optional: bool = False, error: type[Exception]) -> None:
    v = getattr(obj, name)
    if optional and v is None:
        return
    require(isinstance(v, str) and v != "", field_name(obj, name), f"must be a non-empty string, got {v!r}",
            error=error)


def check_tuple(obj, name: str, *, optional: bool = False, error: type[Exception]) -> tuple | None:
    """Normalise a list-like field to a tuple (YAML gives lists) so the config stays hashable."""
    v = getattr(obj, name)
    if v is None and optional:
        return None
    require(isinstance(v, (list, tuple)), field_name(obj, name), f"must be a list, got {v!r}", error=error)
    v = tuple(v)
    object.__setattr__(obj, name, v)
    return v
