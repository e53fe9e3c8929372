"""Hand-made inputs for the table tests: published CSVs in the tidy schema, runs frames and run
folders written with the real RunWriter."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd

from mmke.results import RunWriter
from mmke.tables.published import PUBLISHED_COLUMNS

METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


def cell(table: str, row_label: str, metric: str, value: float | str, *, backbone: str = "blip2",
         task: str = "vqa", editor: str = "ft", reg: str = "none", protocol: str = "single",
         T: int | str = "", setting: str = "", std: float | str = "") -> dict[str, Any]:
    """One published row (one cell of a paper's table)."""
    return dict(table=table, backbone=backbone, task=task, editor=editor, reg=reg,
                protocol=protocol, T=T, setting=setting, row_label=row_label, metric=metric,
                value=value, std=std, note="")


def row_cells(table: str, row_label: str, metrics: dict[str, float], **keys: Any) -> list[dict]:
    """All cells of one published row."""
    return [cell(table, row_label, m, v, **keys) for m, v in metrics.items()]


def write_published(folder: Path, paper: str, rows: list[dict[str, Any]]) -> Path:
    """``<folder>/<paper>.csv`` in the tidy schema; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{paper}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(PUBLISHED_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def run_row(editor: str = "ft", seed: int = 0, *, backbone: str = "tiny_blip2",
            reg: str = "none", task: str = "vqa", protocol: str = "single", T: int = 1,
            metrics: dict[str, float] | None = None, config: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    """One row of a runs frame, as ``load_table_runs`` gives it."""
    name = f"{backbone}_{editor}_{reg}_{task}_{protocol}{T}_{seed}"
    row: dict[str, Any] = dict(run_dir=f"runs/{name}", backbone=backbone, editor=editor,
                               reg=reg, task=task, protocol=protocol, T=T, seed=seed)
    row.update(metrics if metrics is not None else {m: 50.0 for m in METRICS})
    row["config.eval.locality"] = "topk"
    for key, value in (config or {}).items():
        row[f"config.{key}"] = value
    row.update(extra)
    return row


def frame(*rows: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def write_run(folder: Path, *, editor: str = "ft", reg: str = "none", seed: int = 0,
              backbone: str = "tiny_blip2", data: str = "mini_vqa", task: str | None = "vqa",
              reg_config: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
              edits: list[dict[str, Any]] | None = None,
              summary: dict[str, Any] | None = None,
              probes: list[dict[str, Any]] | None = None) -> Path:
    """A complete run folder with a config like ``run.py`` writes (only the keys that matter);
    ``summary``: extra summary fields (e.g. ``leaky``)."""
    data_cfg: dict[str, Any] = {"name": data}
    if task is not None:
        data_cfg["task"] = task
    cfg = {"backbone": {"name": backbone}, "data": data_cfg, "editor": {"name": editor},
           "reg": {"name": reg, **(reg_config or {})}, "protocol": {"name": "single", "T": 1},
           "eval": {"locality": "topk"}, "seed": seed}
    metrics = metrics if metrics is not None else {m: 50.0 for m in METRICS}
    writer = RunWriter(folder)
    writer.write_config(cfg)
    for i, row in enumerate(edits or [{"edit_s": 0.1}]):
        writer.add_edit({"index": i, "ok": True, **metrics, **row})
    for row in probes or []:  # general-capability probe rows (probes.jsonl)
        writer.add_probe(row)
    writer.finish({**metrics, "n_edits": len(edits or [1]), "n_failed": 0,
                   "cost": {"edit_s": 0.1, "steps": 4.0, "wall_s": 2.0, "peak_rss_mb": 2048.0},
                   **(summary or {})})
    writer.close()
    return folder
