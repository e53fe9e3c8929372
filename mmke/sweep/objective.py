"""The number a sweeper optimises: ``objective`` names a value of the run's summary.

``run.py`` returns ``objective_value(summary, cfg.objective)`` to Hydra, which hands it to the
sweeper (Optuna). Accepted names:

- a stored metric: ``rel``, ``t_gen``, ``m_gen``, ``t_loc``, ``m_loc`` (percent);
- a derived column of ``mmke.evaluation.names.DERIVED_METRICS``: ``avg`` (M-ORE's Avg., the mean
  of the five metrics: it rewards an edit that takes without harming locality) or ``gen``;
- a dotted path into the summary, e.g. ``cost.edit_s`` (to minimise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mmke.errors import ConfigError
from mmke.evaluation.names import DERIVED_METRICS


def objective_value(summary: Mapping[str, Any], name: str) -> float:
    """The value ``name`` names in ``summary``; NaN when the run has none (every edit failed),
    which Optuna records as a failed trial. An unknown name is a ``ConfigError``."""
    if name in DERIVED_METRICS and name not in summary:
        return DERIVED_METRICS[name].value(summary)
    node: Any = summary
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            known = sorted([*(k for k, v in summary.items() if not isinstance(v, Mapping)),
                            *DERIVED_METRICS])
            raise ConfigError(f"objective={name!r} is not in the run summary; use one of "
                              f"{known} or a dotted path such as cost.edit_s")
        node = node[part]
    if node is None:
        return math.nan
    try:
        return float(node)
    except (TypeError, ValueError):
        raise ConfigError(f"objective={name!r} is {node!r}, not a number") from None
