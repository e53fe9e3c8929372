"""Entry point: ``python run.py [overrides]`` (see docs/getting-started/running.md)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mmke.distributed import launched_rank, launched_world_size
from mmke.errors import MMKEError
from mmke.launch import check_launch, rank_overrides
from mmke.runner import run
from mmke.sweep import JobContext, objective_value


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        check_launch(HydraConfig.get(), launched_world_size())
        summary = run(cfg, HydraConfig.get().runtime.output_dir, job=JobContext.from_hydra())
        if cfg.get("train_only", False):  # nothing was scored: a sweeper reads the fit's time
            return float(summary["fit"]["seconds"])
        return objective_value(summary, cfg.get("objective", "rel"))  # for sweepers (Optuna)
    except MMKEError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Under accelerate launch only the main process may write Hydra's files into the run folder.
    sys.argv += rank_overrides(sys.argv[1:], launched_rank())
    main()
