"""A total worker budget shared among pools in proportion to what each asked for.

Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["share"]


def share(targets: Sequence[int], budget: int, floors: Sequence[int]) -> list[int]:
    """``targets`` cut to ``budget`` in proportion (largest remainders first), none under its
    floor."""
    total = sum(targets)
    exact = [t * budget / total for t in targets]
    cut = [max(floor, math.floor(x)) for floor, x in zip(floors, exact, strict=True)]
    order = sorted(range(len(targets)), key=lambda i: exact[i] - math.floor(exact[i]),
                   reverse=True)
    for i in order:
        if sum(cut) >= budget:
            break
        cut[i] += 1
    return cut
