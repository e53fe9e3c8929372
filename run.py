"""Entry point: ``python run.py [overrides]`` (see README.md)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mmke.errors import MMKEError
from mmke.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg, HydraConfig.get().runtime.output_dir)
    except MMKEError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return summary.get(cfg.get("objective", "rel"))


if __name__ == "__main__":
    main()
