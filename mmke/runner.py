"""``run(cfg)``: one configured experiment, from Hydra config to a written run folder."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mmke.config import build

from mmke.data.mmedit import check_images
from mmke.distributed import Processes
from mmke.editors.training import FitReport
from mmke.errors import ConfigError
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.probe_sets import load_probe_set
from mmke.results.identity import HASH_KEY, config_hash, find_finished_run
from mmke.results.run_folder import SUMMARY_FILE, RunWriter
from mmke.summary import probe_lines, summarize, summarize_probes, summary_table
from mmke.sweep.job import JobContext

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train_only(name: str, fit: FitReport | None, processes: Processes) -> dict:
    """``train_only=true``: the editor is trained (or found in the cache); nothing is edited."""
    processes.close()
    if fit is None:
        raise ConfigError(f"train_only=true: editor={name} has nothing to train")
    if processes.is_main:
        how = (f"trained {fit.steps_run} steps" + (f" (resumed at step {fit.resumed_from})"
               if fit.resumed_from else "")) if fit.trained_now else "loaded from the cache"
        print(f"editor={name}: {how} in {fit.seconds:.1f} s; networks in {fit.path}")
    return {"fit": fit.as_dict()}


def run(cfg: DictConfig, run_dir: str | Path | None = None, job: JobContext | None = None
        ) -> dict:
    """Build everything from ``cfg``, run the protocol, write the run folder, return the summary.

    Everything that can fail on bad input (weights, annotation files, images, settings) is
    built and checked before the run folder gets its first result file.

    Under ``accelerate launch`` each process edits its shard of the records (whole streams for
    the sequential protocol); the main process gathers all rows and alone writes and logs.
    Every process returns the same summary.

    ``job`` says which sweep the run belongs to (``JobContext.from_hydra()`` in ``run.py``).
    With ``resume`` set, a run whose complete result for the same config hash exists in the
    sweep folder (a single run: in its own folder) is skipped, and the stored summary returned.
    """
    start = time.perf_counter()
    processes = Processes.from_environment()
    processes.set_cpu_threads(cfg.get("cpu_threads", "auto"))
    seed_everything(int(cfg.seed))
    run_dir = Path(run_dir if run_dir is not None else cfg.paths.run_dir)
    cfg = cfg.copy()
    with open_dict(cfg):  # outside a Hydra app the default ${hydra:...} cannot resolve
        cfg.paths.run_dir = str(run_dir)
    job = job if job is not None else JobContext()
    identity = config_hash(OmegaConf.to_container(cfg, resolve=True))
    finished = find_finished_run(job.resume_root(run_dir), identity, first=run_dir) \
        if cfg.get("resume", True) else None
    if finished is not None:
        processes.close()
        return _finished_summary(finished)
    with processes.main_first():  # it fills the on-disk caches, the others read them
        source = build(cfg.data)
    records = source.records("eval", limit=int(cfg.n_edits))
    check_images(records)
    protocol = build(cfg.protocol)
    # editor and regularizer before the weights: a method that is not built yet, or a bad
    # setting, stops the run before a 7B model is loaded
    regularizer = build(cfg.reg)
    editor = build(cfg.editor, regularizer=regularizer)
    first, mine = processes.shard(records, unit=protocol.T)  # a stream stays in one process
    with processes.main_first():
        backbone, reused = job.load_backbone(cfg.backbone, processes.placement(cfg.backbone))
    seed_everything(int(cfg.seed))  # the same random state whether loaded or reused
    spec = build(cfg.eval)
    # probe files are read (and checked) before any edit; their images load lazily, per batch
    evaluator = Evaluator(spec, source.templates, load_probe_set(spec, source, source.templates))
    logger = build(cfg.logger)
    train_split: list = []

    def train_records() -> list:
        # read once, and only when a trained editor or a regularizer draws from the train split
        if not train_split:
            train_split.extend(source.records("train"))
        return train_split

    editor.attach(backbone, source.templates, train_records=train_records)
    fit = editor.fit(train_records()) if editor.needs_training else None
    if cfg.get("train_only", False):
        return _train_only(editor.name, fit, processes)
    editor.check_records(mine)  # e.g. IKE's context limit, before anything is written

    resolved = OmegaConf.to_container(cfg, resolve=True)
    writer = RunWriter(run_dir, is_main=processes.is_main)  # a no-op on the other processes
    writer.write_config(resolved, meta={
        HASH_KEY: identity, "job_num": job.num, "device": str(backbone.device),
        "backbone_reused": reused,
        "backbone_loads": job.backbones.loads if job.backbones is not None else 1})
    if processes.is_main:
        logger.start(resolved, run_dir, sweep=job.sweep_name)

    def sink(row: dict) -> None:
        writer.add_edit(row)
        if processes.is_main:
            logger.log_edit(row["index"], row)

    probes: list[dict] = []  # this process's probe rows; written after the gather, in order
    # the others load after the main process (main_first): start the clock when all are ready,
    # so loop_s times the edit loop alone, not the main process waiting for a late start
    processes.barrier()
    loop_start = time.perf_counter()
    own = protocol.run(editor, evaluator, mine, sink, progress=bool(cfg.progress), start=first,
                       probe_sink=probes.append)
    shards = processes.gather({"rows": own, "forwards": evaluator.forwards, "probes": probes})
    loop_s = time.perf_counter() - loop_start
    for shard in shards[1:]:  # shards are contiguous in rank order: the main process's is first
        for row in shard["rows"]:
            sink(row)
    rows = [row for shard in shards for row in shard["rows"]]
    probe_rows = [row for shard in shards for row in shard["probes"]]
    for row in probe_rows:
        writer.add_probe(row)
    summary = summarize(rows, time.perf_counter() - start, sum(s["forwards"] for s in shards))
    if evaluator.probes is not None:
        summary["probes"] = {"set": evaluator.probes.name, **summarize_probes(probe_rows)}
    summary["n_processes"] = processes.world_size
    summary["cost"]["loop_s"] = loop_s  # the edit loop alone, without building and loading
    summary[HASH_KEY] = identity  # what a resumed sweep matches finished runs by
    if fit is not None:  # trained now or loaded from the cache, and how long that took
        summary["fit"] = fit.as_dict()
    if regularizer.active:  # where its samples came from (train split unless a leaky opt-in)
        summary["regularizer"] = regularizer.summary()
    # leaky: true (and what leaked) when a setting let the edit see the record's scored prompts;
    # the table builder keeps such runs apart from the others (mmke.tables.runs.is_leaky)
    summary.update(regularizer.leak_summary())
    writer.finish(summary)
    processes.close()
    if not processes.is_main:
        return summary
    logger.log_summary(summary)
    logger.finish()
    label = f"{backbone.name} {editor.name}+{regularizer.name} {source.name} {protocol.name}"
    if summary["leaky"]:
        label += f" (leaky: {','.join(summary['leaked'])})"
    table = summary_table(summary, label)
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    if "probes" in summary:
        print(f"probes ({summary['probes']['set']}, accuracy %, unedited -> end of stream):")
        print("\n".join(probe_lines(summary["probes"])))
    if summary["n_failed"]:
        print(f"{summary['n_failed']} of {summary['n_edits']} edits failed (non-finite loss); "
              "see the 'message' field in edits.jsonl")
    print(f"run folder: {run_dir}")
    return summary


def _finished_summary(folder: Path) -> dict:
    """The stored summary of a finished run with the same config, which is skipped."""
    log.info("skipping: finished in %s", folder)
    return json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
