"""Small helpers on sequences that several subpackages compare."""
from __future__ import annotations

from typing import Sequence


def common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences (token ids, characters)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
