"""The core benchmark's data and sizes, shared by the parent, its children and the page."""

from __future__ import annotations

#: ``fedgrain.datasets.make_ordinal(N, p, K, rho=RHO, random_state=seed)`` for every tool.
K = 5
RHO = 0.5
#: The full benchmark: the sizes the targets are judged at.
DEFAULT_SIZES = "1e5x20,1e6x20,1e6x100"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        n, p = part.split("x")
        out.append((int(float(n)), int(float(p))))
    return out
