"""What a run needs to know about the sweep it belongs to: its job number and sweep folder.

``run.py`` builds a ``JobContext`` from Hydra's runtime config (``JobContext.from_hydra``);
``mmke.runner.run`` called directly (tests, notebooks) gets the default: a single run, loading
its backbone afresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mmke.backbones.base import Backbone
from mmke.config import build
from mmke.sweep.pool import PROCESS_BACKBONES, BackbonePool


def job_device(job_num: int | None, accelerator_type: str | None, device_count: int
               ) -> torch.device | None:
    """The device of multirun job ``job_num``: accelerator ``job_num % device_count``.

    None (keep the backbone's own ``device`` setting) outside a multirun or without an
    accelerator. Parallel jobs (joblib) thus spread over the accelerators round-robin, one
    accelerator per job; under SLURM each job sees only the accelerators allocated to it.
    """
    if job_num is None or accelerator_type is None or device_count < 1:
        return None
    if job_num < 0:
        raise ValueError(f"a job number is >= 0, got {job_num}")
    return torch.device(accelerator_type, job_num % device_count)


@dataclass(frozen=True)
class JobContext:
    """One job of a Hydra multirun (``num`` and ``sweep_dir`` set) or a single run (both None).

    ``backbones`` is the process's pool of loaded backbones, reused by the next job that runs
    in this process; None loads every backbone afresh.
    """

    num: int | None = None
    sweep_dir: Path | None = None
    backbones: BackbonePool | None = None

    @classmethod
    def from_hydra(cls) -> JobContext:
        """The context of the job Hydra is running now (requires a Hydra app). Only multirun
        jobs use the process's backbone pool: a single run has no next job to reuse it."""
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return cls(num=int(hydra_cfg.job.num), sweep_dir=Path(hydra_cfg.sweep.dir),
                       backbones=PROCESS_BACKBONES)
        return cls()

    def resume_root(self, run_dir: Path) -> Path:
        """Where a finished run of the same config is looked for: the whole sweep folder in a
        multirun (job numbers may shift when a sweep is restarted), else the run folder."""
        return self.sweep_dir if self.sweep_dir is not None else run_dir

    @property
    def sweep_name(self) -> str | None:
        """The sweep a job belongs to, as ``<parent>/<folder>`` of the sweep folder (with the
        default ``hydra.sweep.dir`` that is ``<date>/<time>``); None for a single run."""
        if self.sweep_dir is None:
            return None
        return "/".join(self.sweep_dir.parts[-2:])

    def backbone_device(self, backbone_cfg: DictConfig) -> torch.device | None:
        """The device this job assigns to its backbone (see ``job_device``), or None to keep
        the config's. Only a backbone left on ``device: auto`` without a ``device_map`` is
        placed: an explicit device or a model spread over devices is the user's choice."""
        if backbone_cfg.get("device", "auto") not in (None, "", "auto"):
            return None
        if backbone_cfg.get("device_map"):
            return None
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        count = torch.accelerator.device_count() if accelerator is not None else 0
        return job_device(self.num, accelerator.type if accelerator is not None else None, count)

    def load_backbone(self, backbone_cfg: DictConfig,
                      placement: Mapping[str, Any] | None = None) -> tuple[Backbone, bool]:
        """The job's backbone and whether it was reused from the previous job of this process
        (only with a pool). ``placement`` holds keyword overrides from the process setup
        (Accelerate's device); a multirun job's own accelerator (``backbone_device``) takes
        precedence, and the two never meet: a multirun under ``accelerate launch`` is refused."""
        overrides = dict(placement or {})
        device = self.backbone_device(backbone_cfg)
        if device is not None:
            overrides["device"] = str(device)
        if self.backbones is not None:
            return self.backbones.get(backbone_cfg, overrides)
        return build(backbone_cfg, **overrides), False
