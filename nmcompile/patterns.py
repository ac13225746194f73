"""The N:M pattern a compile targets, parsed strictly from the command line."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

MAX_M = 32


@dataclass(frozen=True)
class Pattern:
    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m


def parse_pattern(text: str | None) -> Pattern | None:
    """'2:4' -> Pattern(2, 4); 'none' -> None (quantize without pruning)."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() in ("none", "dense"):
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise UserError(f"pattern {text!r}: expected N:M with whole numbers, e.g. 2:4 (or 'none')")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UserError(f"pattern {text!r}: need 0 < N < M (keep N of every M weights)")
    if m > MAX_M:
        raise UserError(f"pattern {text!r}: M may be at most {MAX_M}")
    return Pattern(n, m)
