"""Hydra under a multi-process launcher: what each process must be told, and what is refused.

Hydra runs in every process that ``accelerate launch`` (or ``torchrun``) starts. Three things
follow, and this module handles them:

- every process resolves ``hydra.run.dir`` itself, so a run folder named after the clock
  (the default) differs between processes: the folder must be fixed on the command line;
- every process would write Hydra's ``.hydra/`` folder and job log into it: the other processes
  get ``hydra.output_subdir=null`` and ``hydra/job_logging=none`` before Hydra reads the command
  line (:func:`rank_overrides`), which is the only point where Hydra still takes them;
- a Hydra multirun (``-m``) starts its own jobs: combined with a launcher, each process would run
  the whole sweep. That is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from accelerate.utils import parse_flag_from_env
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mmke.errors import ConfigError

#: Overrides that keep a non-main process from writing into the run folder, each with the
#: prefixes by which a user's own choice of the same setting is recognised (and then kept).
QUIET_OVERRIDES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hydra.output_subdir=null", ("hydra.output_subdir=",)),
    ("hydra/job_logging=none", ("hydra/job_logging=", "hydra.job_logging")),
)


def rank_overrides(argv: Sequence[str], rank: int) -> list[str]:
    """Hydra overrides to append to the command line of process ``rank``: none for the main
    process; for the others, no ``.hydra/`` folder and no job log file (unless the user set
    those settings)."""
    if rank == 0:
        return []
    return [override for override, prefixes in QUIET_OVERRIDES
            if not any(arg.lstrip("+~").startswith(prefixes) for arg in argv)]


def check_launch(hydra_cfg: DictConfig, world_size: int) -> None:
    """Refuse launches that cannot give one correct run folder (see the module docstring)."""
    if world_size > 1 and hydra_cfg.mode == RunMode.MULTIRUN:
        raise ConfigError(f"a Hydra multirun (-m) was started by each of {world_size} processes: "
                          "never combine -m with accelerate launch. Sweep with `python run.py -m "
                          "...` (hydra/launcher=joblib for parallel jobs), or run one "
                          "configuration with `accelerate launch run.py ...`")
    if world_size > 1:
        raw_dir = OmegaConf.to_container(hydra_cfg.run, resolve=False).get("dir")
        if isinstance(raw_dir, str) and "${now:" in raw_dir:
            raise ConfigError(f"{world_size} processes would each name their own run folder after "
                              "the clock: fix it on the command line, e.g. "
                              "`accelerate launch run.py ... hydra.run.dir=outputs/runs/my_run`")
    if world_size == 1 and _cpu_launch_of_several_processes():
        raise ConfigError("accelerate launch --cpu --num_processes N started one process: "
                          "Accelerate starts several CPU processes only through MPI "
                          "(--mpirun_hostfile). On one machine use `ACCELERATE_USE_CPU=1 "
                          "accelerate launch --multi_gpu --num_processes N run.py ...` (torchrun "
                          "underneath) or `torchrun --nproc_per_node N run.py ...`")


def _cpu_launch_of_several_processes() -> bool:
    """``accelerate launch --cpu --num_processes N>1`` without MPI: its simple launcher starts a
    single process but still sets the rendezvous address for N."""
    return parse_flag_from_env("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ
