"""Metric keys and their display names: the one place the papers' column labels live."""

from __future__ import annotations

METRIC_LABELS: dict[str, str] = {
    "rel": "Rel.",
    "t_gen": "T-Gen.",
    "m_gen": "M-Gen.",
    "t_loc": "T-Loc.",
    "m_loc": "M-Loc.",
}
