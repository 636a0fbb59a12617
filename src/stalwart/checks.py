"""Argument checks every public entry point shares, so a mistake reads the same everywhere: what was
given, and what is accepted.
"""

from __future__ import annotations

from typing import Literal, overload

__all__ = ["int_at_least"]


@overload
def int_at_least(
    name: str,
    value: object,
    minimum: int,
    *,
    optional: Literal[False] = False,
    maximum: int | None = None,
    note: str = "",
) -> int: ...


@overload
def int_at_least(
    name: str,
    value: object,
    minimum: int,
    *,
    optional: bool,
    maximum: int | None = None,
    note: str = "",
) -> int | None: ...


def int_at_least(
    name: str,
    value: object,
    minimum: int,
    *,
    optional: bool = False,
    maximum: int | None = None,
    note: str = "",
) -> int | None:
    """``value`` if it is an int (not a bool) from ``minimum`` up (to ``maximum``), or None when
    ``optional``; else ``ValueError("{name}={value!r} is not accepted; use an int >= {minimum}...")``
    (``from {minimum} to {maximum}`` when it was too big), with `` or None`` when optional and ``note``
    (", e.g. ...", " (what it counts)") after it."""
    if optional and value is None:
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    too_big = is_int and maximum is not None and value > maximum  # type: ignore[operator]
    if not is_int or value < minimum or too_big:  # type: ignore[operator]
        accepted = f"an int from {minimum} to {maximum}" if too_big else f"an int >= {minimum}"
        raise ValueError(
            f"{name}={value!r} is not accepted; use {accepted}{' or None' if optional else ''}{note}"
        )
    return value  # type: ignore[return-value]
