"""Kubernetes quantity parsing and normalising for CPU, memory and disk.

Resources are declared by people, in the spellings they know from Kubernetes (``"500m"``, ``"32Gi"``), and
are later compared (request <= limit) and rendered back into manifests. Parsing them here, with plain
stdlib and exact arithmetic, lets a typo fail when the task is declared instead of when the Pod is
rejected by the API server minutes into a deployment.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

__all__ = [
    "BINARY_SUFFIXES",
    "BYTE_SUFFIXES_HINT",
    "DECIMAL_SUFFIXES",
    "format_bytes",
    "format_millicores",
    "normalize_bytes",
    "parse_bytes",
    "parse_millicores",
]

BINARY_SUFFIXES: dict[str, int] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
"""Binary (power of two) suffixes Kubernetes accepts for byte quantities."""

DECIMAL_SUFFIXES: dict[str, int] = {
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
"""Decimal (power of ten) suffixes Kubernetes accepts for byte quantities."""

BYTE_SUFFIXES_HINT = " ".join([*BINARY_SUFFIXES, *DECIMAL_SUFFIXES])

_NUMBER_RE = re.compile(r"^(?P<sign>[+-]?)(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<suffix>[A-Za-z]*)$")


def _is_number(value: object) -> bool:
    # bool is an int subclass; True as "1 CPU" is always a mistake, so it is not a number here.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _byte_error(field: str, value: object) -> ValueError:
    return ValueError(
        f"{field}={value!r} is not a Kubernetes quantity; use a number with one of the suffixes "
        f"{BYTE_SUFFIXES_HINT}, e.g. '32Gi'"
    )


def parse_bytes(value: str | int, field: str = "memory") -> int:
    """Return the number of bytes in a Kubernetes byte quantity (``"32Gi"``, ``"1G"``, ``1024``).

    Fractions of a byte are rounded up, as the Kubernetes API server does. ``field`` only names the value
    in error messages, so that the user sees which argument was wrong.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(
            f"{field}={value!r} must be a Kubernetes quantity string such as '32Gi' or an int number of "
            f"bytes, not {type(value).__name__}"
        )
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{field}={value!r} must be greater than zero, e.g. '32Gi'")
        return value
    match = _NUMBER_RE.match(value.strip())
    if match is None:
        raise _byte_error(field, value)
    suffix = match["suffix"]
    if suffix:
        multiplier = BINARY_SUFFIXES.get(suffix) or DECIMAL_SUFFIXES.get(suffix)
        if multiplier is None:
            raise _byte_error(field, value)
    else:
        multiplier = 1
    amount = (Decimal(match["number"]) * multiplier).to_integral_value(rounding=ROUND_CEILING)
    if match["sign"] == "-" or amount <= 0:
        raise ValueError(f"{field}={value!r} must be greater than zero, e.g. '32Gi'")
    return int(amount)


def format_bytes(amount: int) -> str:
    """Render a byte count with the largest binary suffix that divides it exactly (``2**30`` -> ``"1Gi"``)."""
    for suffix, multiplier in reversed(BINARY_SUFFIXES.items()):
        if amount % multiplier == 0:
            return f"{amount // multiplier}{suffix}"
    return str(amount)


def normalize_bytes(value: str | int, field: str = "memory") -> str:
    """Validate a byte quantity and return its manifest spelling.

    Strings are kept as written (minus surrounding whitespace) because every string accepted here is
    also accepted by Kubernetes and users recognise their own spelling; ints become ``"512Mi"`` style.
    """
    amount = parse_bytes(value, field)
    if isinstance(value, int):
        return format_bytes(amount)
    return value.strip()


def _cpu_error(field: str, value: object) -> ValueError:
    return ValueError(
        f"{field}={value!r} is not a CPU quantity; use cores as a number (2, 0.5, '2') or millicores "
        f"with the suffix m ('500m')"
    )


def parse_millicores(value: int | float | str, field: str = "cpu") -> int:
    """Return a CPU quantity in millicores (``0.5`` and ``"500m"`` -> ``500``).

    Kubernetes resolves CPU to 1m; finer values are refused instead of rounded so that the number the
    user wrote is the number that reaches the scheduler.
    """
    if isinstance(value, bool) or not (_is_number(value) or isinstance(value, str)):
        raise TypeError(
            f"{field}={value!r} must be a number of cores (2, 0.5) or a string such as '500m', "
            f"not {type(value).__name__}"
        )
    if isinstance(value, str):
        match = _NUMBER_RE.match(value.strip())
        if match is None or match["suffix"] not in ("", "m"):
            raise _cpu_error(field, value)
        number = Decimal(match["sign"] + match["number"])
        millicores = number if match["suffix"] == "m" else number * 1000
    else:
        try:
            millicores = Decimal(str(value)) * 1000
        except InvalidOperation:  # pragma: no cover - str(float) is always a valid Decimal
            raise _cpu_error(field, value) from None
        if not millicores.is_finite():
            raise _cpu_error(field, value)
    if millicores <= 0:
        raise ValueError(f"{field}={value!r} must be greater than zero, e.g. 2 or '500m'")
    if millicores != millicores.to_integral_value():
        raise ValueError(f"{field}={value!r} is finer than the 1m (0.001 core) Kubernetes resolves")
    return int(millicores)


def format_millicores(millicores: int) -> str:
    """Render millicores the way Kubernetes prints them: whole cores as ``"2"``, otherwise ``"500m"``."""
    if millicores % 1000 == 0:
        return str(millicores // 1000)
    return f"{millicores}m"
