"""load_runs / load_summaries over a tree of run folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmke.results import RunWriter, load_runs, load_summaries


def config(editor: str, seed: int, T: int | None = None) -> dict:
    protocol: dict = {"name": "sequential" if T else "single"}
    if T is not None:
        protocol["T"] = T
    return {"backbone": {"name": "tiny"}, "editor": {"name": editor}, "reg": {"name": "none"},
            "data": {"task": "vqa"}, "protocol": protocol, "seed": seed}


def make_run(run_dir: Path, cfg: dict | None, n_edits: int, finish: bool = True) -> None:
    w = RunWriter(run_dir)
    if cfg is not None:
        w.write_config(cfg)
    for i in range(n_edits):
        w.add_edit({"uid": f"e{i}", "rel": float(i % 2), "t_loc": 1.0})
    if finish:
        w.finish({"rel": 0.5, "n_edits": n_edits, "time": {"edit_s": 1.5}})
    w.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_run(tmp_path / "sweep" / "0", config("ft", 0), 3)
    make_run(tmp_path / "sweep" / "1", config("ft", 1, T=10), 2)
    make_run(tmp_path / "other" / "deep" / "run", config("mend", 0), 4)
    make_run(tmp_path / "sweep" / "crashed", config("ft", 2), 5, finish=False)
    return tmp_path


def test_load_runs_tree(tree: Path) -> None:
    with pytest.warns(UserWarning, match="crashed"):
        df = load_runs(tree)
    assert len(df) == 3 + 2 + 4
    assert list(df.columns[:8]) == ["run_dir", "backbone", "editor", "reg", "task", "protocol",
                                    "T", "seed"]
    assert {"uid", "rel", "t_loc"} <= set(df.columns)
    assert df.groupby("editor").size().to_dict() == {"ft": 5, "mend": 4}
    assert df.groupby("run_dir").size().sort_index().tolist() == [4, 3, 2]
    assert df.groupby("T").size().to_dict() == {1: 7, 10: 2}  # missing protocol.T -> 1
    assert set(df["task"]) == {"vqa"} and set(df["backbone"]) == {"tiny"}
    assert not df["run_dir"].str.contains("crashed").any()


def test_load_runs_several_paths_and_overlap(tree: Path) -> None:
    with pytest.warns(UserWarning):
        df = load_runs([tree / "sweep", str(tree / "other"), tree / "sweep" / "0"])
    assert len(df) == 9  # sweep/0 given twice is read once


def test_load_run_folder_itself(tree: Path) -> None:
    df = load_runs(tree / "sweep" / "1")
    assert len(df) == 2 and set(df["seed"]) == {1}


def test_load_summaries_one_row_per_run(tree: Path) -> None:
    with pytest.warns(UserWarning, match="incomplete"):
        df = load_summaries(tree)
    assert len(df) == 3
    assert sorted(df["n_edits"]) == [2, 3, 4]
    assert "time.edit_s" in df.columns  # nested summaries are flattened
    assert sorted(df["editor"]) == ["ft", "ft", "mend"]


def test_missing_config_keys_give_none(tmp_path: Path) -> None:
    make_run(tmp_path / "old", {"editor": {"name": "ft"}, "backbone": "tiny"}, 1)
    df = load_runs(tmp_path)
    row = df.iloc[0]
    assert row["editor"] == "ft"
    for col in ("backbone", "reg", "task", "protocol", "seed"):
        assert row[col] is None
    assert row["T"] == 1


def test_missing_config_file_warns_and_gives_none(tmp_path: Path) -> None:
    make_run(tmp_path / "noconf", None, 2)
    with pytest.warns(UserWarning, match="config.yaml"):
        df = load_summaries(tmp_path)
    assert len(df) == 1 and df.iloc[0]["editor"] is None


def test_no_runs_gives_empty_frame_with_run_columns(tmp_path: Path) -> None:
    df = load_runs(tmp_path)
    assert df.empty and "editor" in df.columns


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_runs(tmp_path / "nope")
