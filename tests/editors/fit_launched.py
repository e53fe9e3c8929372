"""Fits trained editors in one ``accelerate launch`` process group, each as ``python run.py
editor=<name> train_only=true <overrides>`` builds and fits it (one launch for several editors
keeps the test short). ``python -m tests.editors.fit_launched <name>,<name> <overrides>...``;
the overrides must set ``editor.cache_dir``, where the main process writes the fits."""

from __future__ import annotations

import sys

from mmke.config import build
from mmke.distributed import Processes
from tests.conftest import compose_config


def main(names: list[str], overrides: list[str]) -> None:
    processes = Processes.from_environment()
    for name in names:
        cfg = compose_config([f"editor={name}", *overrides])
        processes.set_cpu_threads(cfg.get("cpu_threads", "auto"))
        backbone = build(cfg.backbone, **processes.placement(cfg.backbone))
        source = build(cfg.data)
        train = source.records("train")
        editor = build(cfg.editor)
        editor.attach(backbone, source.templates, train_records=lambda: train)
        report = editor.fit(train)
        if processes.is_main:
            print(f"{name}: {report.key} trained {report.steps_run} steps")


if __name__ == "__main__":
    main(sys.argv[1].split(","), sys.argv[2:])
