"""Sweeps: the job context of a Hydra multirun, backbone reuse across the jobs of a process,
and the objective returned to sweepers. Resuming by config hash lives in
``mmke.results.identity``; launchers and the Optuna search in ``conf/hydra/launcher/`` and
``conf/hparams_search/``."""

from mmke.sweep.job import JobContext, job_device
from mmke.sweep.objective import objective_value
from mmke.sweep.pool import PROCESS_BACKBONES, BackbonePool

__all__ = ["PROCESS_BACKBONES", "BackbonePool", "JobContext", "job_device", "objective_value"]
