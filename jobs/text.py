"""Small text helpers shared by the commands, the job and its report: one line of an error,
numbers with SI prefixes. One home each, so that every message and table says them alike."""

from __future__ import annotations

#: SI prefixes from the largest down (``si`` picks the first the value reaches).
SI_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def first_line(text: object, default: str = "") -> str:
    """The first non-blank line of ``text``, stripped (``default`` when there is none)."""
    for line in str(text if text is not None else "").splitlines():
        if line.strip():
            return line.strip()
    return default


def message_line(exc: BaseException) -> str:
    """The exception's own message, one line; its type's name when the message is empty."""
    return first_line(exc, type(exc).__name__)


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty): how a
    row's ``error``, a worker's death and a failed check are told in one line."""
    line = first_line(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def one_line(text: object) -> str:
    """``text`` with every run of white space (newlines included) folded to one space."""
    return " ".join(str(text).split())


def si(value: float, unit: str = "", digits: int = 3) -> str:
    """``value`` with an SI prefix and ``digits`` significant digits: ``si(2.5e13, "MAC")`` is
    ``"25 TMAC"``; below 1000 no prefix (``"512 MAC"``)."""
    for factor, prefix in SI_PREFIXES:
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}".strip()


__all__ = ["SI_PREFIXES", "error_line", "first_line", "message_line", "one_line", "si"]
