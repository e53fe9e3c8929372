"""The W&B logger, offline: what a real run writes, and that W&B failures never end a run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmke.loggers.wandb import WandbLogger, run_tags
from tests.conftest import ROOT, cache_dir
from tests.loggers import wandb_records


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> dict[str, str]:
    """Offline mode, and every W&B folder (settings, cache, data) inside the test's tmp."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb_data"), "WANDB_SILENT": "true"}
    for key, value in env.items():
        if key.endswith("_DIR"):
            Path(value).mkdir(exist_ok=True)
        monkeypatch.setenv(key, value)
    return env


def run_cli(tmp_path: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run.py", "progress=false", f"hydra.run.dir={tmp_path / 'run'}",
         "logger=wandb", "n_edits=2", *overrides], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **env, "MMKE_CACHE_DIR": str(cache_dir())}, timeout=600)


def test_a_run_logs_config_edits_summary_and_table(tmp_path, wandb_env, pretrained) -> None:
    proc = run_cli(tmp_path, wandb_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    edits = [json.loads(line) for line in (run_dir / "edits.jsonl").read_text().splitlines()]
    (log_file,) = wandb_records.offline_runs(run_dir / "wandb")  # W&B files in the run folder

    logged = wandb_records.summary(log_file)
    for key in ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "n_edits", "n_failed", "config_hash"):
        assert logged[key] == pytest.approx(summary[key]), key
    assert logged["cost"]["edit_s"] == pytest.approx(summary["cost"]["edit_s"])
    assert logged["edits.nrows"] == 2 and logged["edits._type"] == "table-file"

    rows = [h for h in wandb_records.history(log_file) if "rel" in h]
    assert [(h["_step"], h["index"]) for h in rows] == [(0, 0), (1, 1)]
    assert [h["t_loc"] for h in rows] == pytest.approx([e["t_loc"] for e in edits])
    assert [h["peak_mem_mb"] for h in rows] == pytest.approx([e["peak_mem_mb"] for e in edits])

    config = wandb_records.config(log_file)
    assert config["editor"]["name"] == "ft" and config["n_edits"] == 2
    info = wandb_records.run_info(log_file)
    assert set(info.tags) == {"backbone:tiny_blip2", "editor:ft", "reg:none", "task:vqa",
                              "protocol:single"}
    assert info.display_name == "run" and info.project == "mmke" and info.run_group == ""


def test_broken_wandb_settings_leave_the_run_complete(tmp_path, wandb_env, pretrained) -> None:
    proc = run_cli(tmp_path, wandb_env, "logger.mode=bogus")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    output = proc.stdout + proc.stderr
    assert output.count("wandb init failed") == 1 and "Traceback" not in output


def config() -> dict:
    return {"backbone": {"name": "tiny"}, "editor": {"name": "ft"}, "reg": {"name": "none"},
            "data": {"task": "vqa"}, "protocol": {"name": "single"}, "seed": 0}


def test_tags_and_sweep_group(tmp_path, wandb_env) -> None:
    assert run_tags({"editor": {"name": "ft"}, "data": {}}) == ["editor:ft"]
    logger = WandbLogger(tags=["mine"])
    logger.start(config(), tmp_path / "3", sweep="2026-01-02/03-04-05")
    logger.log_edit(0, {"rel": 100.0, "uid": "a", "ok": True})
    logger.log_summary({"rel": 100.0})
    logger.finish()
    (log_file,) = wandb_records.offline_runs(tmp_path / "3")
    info = wandb_records.run_info(log_file)
    assert info.run_group == "2026-01-02/03-04-05" and info.display_name == "3"
    assert "mine" in info.tags and "protocol:single" in info.tags
    explicit = WandbLogger(group="mine", dir=str(tmp_path / "elsewhere"))
    explicit.start(config(), tmp_path / "4", sweep="ignored")
    explicit.finish()
    (log_file,) = wandb_records.offline_runs(tmp_path / "elsewhere")
    assert wandb_records.run_info(log_file).run_group == "mine"


def ours(caplog) -> list[str]:
    """The messages the logger itself logged (W&B logs plenty of its own)."""
    return [r.getMessage() for r in caplog.records if r.name == "mmke.loggers.wandb"]


def test_missing_wandb_package_is_a_warning(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    logger = WandbLogger()
    with caplog.at_level(logging.WARNING, logger="mmke.loggers.wandb"):
        logger.start(config(), tmp_path)
        logger.log_edit(0, {"rel": 1.0})
        logger.log_summary({"rel": 1.0})
        logger.log_figure("f", object())
        logger.finish()
    (warning,) = ours(caplog)
    assert warning.startswith("wandb init failed (ModuleNotFoundError")


def test_failures_while_logging_are_warned_once(tmp_path, wandb_env, caplog) -> None:
    logger = WandbLogger()
    logger.start(config(), tmp_path)
    logger._run.finish()  # W&B's run ends under the logger (as when its service process dies)
    with caplog.at_level(logging.WARNING, logger="mmke.loggers.wandb"):
        logger.log_edit(0, {"rel": 1.0})
        logger.log_edit(1, {"rel": 1.0})
        logger.log_summary({"rel": 1.0})
        logger.finish()
    (warning,) = ours(caplog)
    assert warning.startswith("wandb log failed (UsageError")
