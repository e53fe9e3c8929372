"""``run(cfg)``: one configured experiment, from Hydra config to a written run folder."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mmke.config import build

from mmke.data.mmedit import check_images
from mmke.evaluation.evaluator import Evaluator
from mmke.results.run_folder import RunWriter
from mmke.summary import summarize, summary_table

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Build everything from ``cfg``, run the protocol, write the run folder, return the summary.

    Everything that can fail on bad input (weights, annotation files, images, settings) is
    built and checked before the run folder gets its first result file.
    """
    start = time.perf_counter()
    seed_everything(int(cfg.seed))
    run_dir = Path(run_dir if run_dir is not None else cfg.paths.run_dir)
    cfg = cfg.copy()
    with open_dict(cfg):  # outside a Hydra app the default ${hydra:...} cannot resolve
        cfg.paths.run_dir = str(run_dir)
    source = build(cfg.data)
    records = source.records("eval", limit=int(cfg.n_edits))
    check_images(records)
    backbone = build(cfg.backbone)
    regularizer = build(cfg.reg)
    editor = build(cfg.editor, regularizer=regularizer)
    protocol = build(cfg.protocol)
    evaluator = Evaluator(build(cfg.eval), source.templates)
    logger = build(cfg.logger)
    if editor.needs_training:
        editor.fit(source.records("train"))
    editor.attach(backbone, source.templates)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    writer = RunWriter(run_dir)
    writer.write_config(resolved)
    logger.start(resolved, run_dir)

    def sink(row: dict) -> None:
        writer.add_edit(row)
        logger.log_edit(row["index"], row)

    rows = protocol.run(editor, evaluator, records, sink, progress=bool(cfg.progress))
    summary = summarize(rows, time.perf_counter() - start, evaluator.forwards)
    writer.finish(summary)
    logger.log_summary(summary)
    logger.finish()
    label = f"{backbone.name} {editor.name}+{regularizer.name} {source.name} {protocol.name}"
    table = summary_table(summary, label)
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    if summary["n_failed"]:
        print(f"{summary['n_failed']} of {summary['n_edits']} edits failed (non-finite loss); "
              "see the 'message' field in edits.jsonl")
    print(f"run folder: {run_dir}")
    return summary
