"""RunWriter: round trip, crash safety, non-main ranks, JSON conversion, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mmke.errors import ConfigError
from mmke.results import RunWriter
from mmke.results.atomic import atomic_write_json, atomic_write_text, to_jsonable

CONFIG = {"backbone": {"name": "tiny"}, "editor": {"name": "ft", "lr": 1e-4}, "seed": 3}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_round_trip(tmp_path: Path) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)
    w.write_config(CONFIG)
    w.add_edit({"rel": 1.0, "t_gen": 0.5, "uid": "a", "note": None})
    w.add_edit({"rel": 0.0, "t_gen": 1.0, "uid": "b", "note": None})
    assert not RunWriter.is_complete(run)
    w.finish({"rel": 0.5, "n": 2})

    assert RunWriter.is_complete(run)
    assert OmegaConf.to_container(OmegaConf.load(run / "config.yaml")) == CONFIG
    assert read_lines(run / "edits.jsonl") == [
        {"rel": 1.0, "t_gen": 0.5, "uid": "a", "note": None},
        {"rel": 0.0, "t_gen": 1.0, "uid": "b", "note": None},
    ]
    assert not (run / "edits.jsonl.partial").exists()
    assert json.loads((run / "summary.json").read_text()) == {"rel": 0.5, "n": 2}
    assert sorted(p.name for p in run.iterdir()) == [
        "config.yaml", "edits.jsonl", "meta.json", "summary.json"]  # no temp files left


def test_meta_has_provenance_but_no_machine_paths(tmp_path: Path) -> None:
    w = RunWriter(tmp_path)
    w.write_config(CONFIG)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert {"git_commit", "git_dirty", "mmke_version", "python_version", "torch_version",
            "started_at"} <= meta.keys()
    assert isinstance(meta["git_commit"], str) and meta["git_commit"]
    text = (tmp_path / "meta.json").read_text()
    assert str(tmp_path) not in text and "/home/" not in text and "/work/" not in text


def test_crash_leaves_only_partial(tmp_path: Path) -> None:
    w = RunWriter(tmp_path)
    w.write_config(CONFIG)
    w.add_edit({"rel": 1.0})
    w.add_edit({"rel": 0.0})
    # Simulated crash: finish is never called. Rows are flushed, so they are readable...
    assert len(read_lines(tmp_path / "edits.jsonl.partial")) == 2
    # ...but the folder is not a result.
    assert not RunWriter.is_complete(tmp_path)
    assert not (tmp_path / "edits.jsonl").exists()
    w.close()


def test_restart_after_crash_discards_stale_partial(tmp_path: Path) -> None:
    crashed = RunWriter(tmp_path)
    crashed.add_edit({"rel": 9.0})
    crashed.close()
    w = RunWriter(tmp_path)
    w.add_edit({"rel": 1.0})
    w.finish({})
    assert read_lines(tmp_path / "edits.jsonl") == [{"rel": 1.0}]


def test_complete_run_is_not_overwritten(tmp_path: Path) -> None:
    RunWriter(tmp_path).finish({"rel": 1.0})
    with pytest.raises(ConfigError, match="already holds a complete run"):
        RunWriter(tmp_path)


def test_no_edits_still_complete(tmp_path: Path) -> None:
    RunWriter(tmp_path).finish({"n": 0})
    assert RunWriter.is_complete(tmp_path)
    assert (tmp_path / "edits.jsonl").read_text() == ""


def test_misuse_raises(tmp_path: Path) -> None:
    w = RunWriter(tmp_path)
    w.finish({})
    with pytest.raises(RuntimeError):
        w.add_edit({"rel": 1.0})
    with pytest.raises(RuntimeError):
        w.finish({})


def test_non_main_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    w = RunWriter(run, is_main=False)
    w.write_config(CONFIG)
    w.add_edit({"rel": 1.0})
    w.finish({"rel": 1.0})
    assert not run.exists()


def test_numpy_and_torch_scalars_become_python(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    w = RunWriter(tmp_path)
    w.add_edit({"np_f": np.float32(0.25), "np_i": np.int64(7), "np_b": np.bool_(True),
                "t_f": torch.tensor(0.5), "t_i": torch.tensor(3), "arr": np.arange(2),
                "path": Path("a/b")})
    w.finish({"mean": torch.tensor(0.75, dtype=torch.float64), np.int64(1): "k"})
    (row,) = read_lines(tmp_path / "edits.jsonl")
    assert row == {"np_f": 0.25, "np_i": 7, "np_b": True, "t_f": 0.5, "t_i": 3, "arr": [0, 1],
                   "path": "a/b"}
    assert type(row["np_i"]) is int and type(row["np_b"]) is bool
    assert json.loads((tmp_path / "summary.json").read_text()) == {"mean": 0.75, "1": "k"}


def test_to_jsonable_rejects_unknown_types() -> None:
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"x": object()})


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):  # fails while serializing: the old file must survive
        atomic_write_json(target, {"bad": object()})
    atomic_write_text(tmp_path / "x.txt", "hello")
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "x.txt"]


def test_atomic_write_failure_during_write_removes_temp(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("mmke.results.atomic.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_git_state_in_a_checkout_and_without_git(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from mmke.results import run_folder

    if run_folder._git(tmp_path, "--version") is None:
        pytest.skip("git not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("1")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    commit, dirty = run_folder._git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "f.txt").write_text("2")
    assert run_folder._git_state(tmp_path)[1] is True

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(run_folder.subprocess, "run", no_git)
    assert run_folder._git_state(tmp_path) == ("unknown", None)


# --- build_folder_once: the cache folders (tiny backbones, the sentence encoder) ---------------

def test_build_folder_once_builds_once_and_leaves_nothing_on_a_crash(tmp_path):
    from mmke.results.atomic import build_folder_once
    calls = []

    def fill(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(b"w")
        return "done"

    folder = tmp_path / "cache" / "model"

    def crash(tmp):
        (tmp / "half.bin").write_bytes(b"h")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_folder_once(folder, crash, "marker")
    assert list((tmp_path / "cache").iterdir()) == []  # no folder, no temporary sibling
    folder.mkdir()  # an unmarked leftover of an older, interrupted layout
    (folder / "stale.bin").write_bytes(b"s")
    assert build_folder_once(folder, fill, "marker") == folder
    assert sorted(p.name for p in folder.iterdir()) == ["marker", "weights.bin"]
    assert build_folder_once(folder, fill, "marker") == folder and len(calls) == 1
