"""Run folders: ``RunWriter`` writes one run atomically; ``load_runs``/``load_summaries``/
``load_probes`` read complete runs back as tidy pandas tables."""

from mmke.results.load import load_probes, load_runs, load_summaries
from mmke.results.run_folder import RunWriter

__all__ = ["RunWriter", "load_probes", "load_runs", "load_summaries"]
