"""Helpers shared by the real-dataset adapters: warnings for recoverable defects, folder listings."""

from __future__ import annotations

import warnings
from pathlib import Path

from bench.errors import DataWarning


def warn(message: str) -> None:
    """Report a recoverable defect (the message names the file) as a :class:`DataWarning`."""
    warnings.warn(message, DataWarning, stacklevel=3)


def listing(folder: Path, limit: int = 8) -> str:
    """What a folder holds, for 'expected ..., found ...' errors."""
    if not folder.is_dir():
        return "no such folder" if not folder.exists() else "a file, not a folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return "an empty folder"
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def case_key(case: str) -> tuple[int, str]:
    """Numeric order for numeric ids, then the rest alphabetically."""
    return (int(case), "") if case.isdigit() else (1 << 62, case)
