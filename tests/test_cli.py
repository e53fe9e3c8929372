"""`python run.py` end to end in a subprocess: run folder, summary, and clear failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHORT_BUILD, SMALL_WORLD, cache_dir


def run_cli(*overrides: str, tmp_path: Path, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMKE_CACHE_DIR": str(cache or cache_dir()), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "run.py", "progress=false", f"hydra.run.dir={tmp_path / 'run'}",
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_default_run_writes_a_complete_run_folder(tmp_path, pretrained):
    proc = run_cli("n_edits=3", "logger=csv", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "meta.json", "edits.jsonl", "summary.json", "edits.csv", "summary.csv"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_edits"] == 3 and summary["n_failed"] == 0
    assert len((run / "edits.jsonl").read_text().splitlines()) == 3
    for label in ("Rel.", "T-Gen.", "M-Gen.", "T-Loc.", "M-Loc."):
        assert label in proc.stdout


@pytest.mark.parametrize("protocol", ["sequential", "online"])
def test_stream_protocols_from_the_command_line(tmp_path, pretrained, protocol):
    proc = run_cli("n_edits=4", f"protocol={protocol}", "protocol.T=2", "editor=none",
                   tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "edits.jsonl").read_text().splitlines()]
    assert [r["stream"] for r in rows] == [0, 0, 1, 1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # online: each edit scored again at the end of its stream (retention), in rows and summary
    assert ("rel_final" in rows[0] and "rel_final" in summary) == (protocol == "online")


@pytest.mark.parametrize("overrides, needle", [
    (["backbone=blip2"], "backbone.path is not set"),
    (["backbone=blip2", "backbone.path=/no/such/blip2"], "no weights at backbone.path=/no/such/blip2"),
    (["data=mmedit_vqa"], "data.root is not set"),
])
def test_missing_inputs_exit_nonzero_with_the_setting_named(tmp_path, overrides, needle):
    proc = run_cli(*overrides, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_ike_past_the_context_stops_before_the_first_edit(tmp_path, pretrained):
    """IKE prompts that do not fit the backbone's context stop the run before its first edit:
    exit code 2, the setting named, no run folder. (The base tiny BLIP-2 reads 128 positions; an
    E-VQA-mini prompt with its fact needs more even without demonstrations, so k=0 shows it
    without encoding the demonstration bank; tests/editors/test_ike.py checks the largest k.)"""
    proc = run_cli("editor=ike", "editor.k=0", "backbone.in_context.enabled=false", "n_edits=3",
                   tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "editor.k=0" in proc.stderr and "positions" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_missing_images_are_reported_before_anything_runs(tmp_path, shared_data):
    proc = run_cli("data=mmedit_vqa", f"data.annotation_dir={shared_data / 'mmedit'}",
                   f"data.image_root={tmp_path / 'images'}", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "image file(s) missing" in proc.stderr and "data.root" in proc.stderr
    assert not (tmp_path / "run" / "edits.jsonl.partial").exists()


def test_malformed_annotation_file_names_file_and_record(tmp_path):
    bad = tmp_path / "ann"
    bad.mkdir()
    (bad / "vqa_eval.json").write_text(json.dumps([{"src": "q", "pred": "a"}]))
    (bad / "vqa_train.json").write_text("[]")
    proc = run_cli("data=mmedit_vqa", f"data.annotation_dir={bad}", f"data.image_root={tmp_path}",
                   tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "vqa_eval.json" in proc.stderr and "record 0" in proc.stderr and "'alt'" in proc.stderr


def test_unknown_config_option_fails(tmp_path):
    proc = run_cli("editor=no_such_editor", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "no_such_editor" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("build", ["short", pytest.param("full", marks=pytest.mark.families)])
@pytest.mark.parametrize("backbone", ["tiny_llava", "tiny_minigpt4", "tiny_qwen2vl"])
def test_every_tiny_family_runs_end_to_end(tmp_path, small_world, backbone, build):
    """`python run.py backbone=tiny_<family>` edits with FT (its per-family settings) and writes
    a complete run folder; the edits take. ``short``: on the small world's short build, so that
    every family's command-line path runs in `make test`; ``full``: on the default build."""
    overrides, cache = [], None
    if build == "short":
        overrides = [*SHORT_BUILD[backbone], *[f"world.{k}={v}" for k, v in SMALL_WORLD.items()]]
        cache = small_world.parents[1]
    proc = run_cli(f"backbone={backbone}", "n_edits=3", *overrides, tmp_path=tmp_path, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_edits"] == 3 and summary["n_failed"] == 0
    assert summary["rel"] >= 90.0, summary
    config = (run / "config.yaml").read_text()
    assert "ffn_gate" in config  # conf/editor_backbone/ft_<family>.yaml arrived
