"""What the benchmark scripts print about per-edit rows: the five metrics, averaged."""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


def mean_row(rows: Sequence[dict], keys: Sequence[str] = METRICS, suffix: str = "") -> str:
    """``rel 95.0  t_gen 93.3 ...``: each metric's mean over ``rows`` (``suffix``: read
    ``<metric><suffix>``, e.g. ``_final`` for the end-of-stream scores)."""
    parts = []
    for m in keys:
        values = [r[m + suffix] for r in rows if r.get(m + suffix) is not None]  # None: not scored
        parts.append(f"{m} {sum(values) / max(1, len(values)):5.1f}")
    return "  ".join(parts)
