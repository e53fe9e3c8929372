"""Run identity: what the config hash ignores, what it does not, and finding finished runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mmke.results import RunWriter
from mmke.results.identity import HASH_KEY, config_hash, find_finished_run, identity_config

CONFIG = {
    "paths": {"cache_dir": "a/cache", "output_dir": "out", "run_dir": "out/runs/1"},
    "backbone": {"name": "tiny", "cache_dir": "a/cache", "progress": True, "device": "auto"},
    "editor": {"name": "ft", "lr": 0.005, "layers": [-3, -2, -1]},
    "logger": {"_target_": "mmke.loggers.none.NoneLogger"},
    "seed": 0, "n_edits": 50, "progress": True, "objective": "rel", "resume": True,
}


def changed(dotted: str, value: object) -> dict:
    cfg = copy.deepcopy(CONFIG)
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return cfg


def test_hash_is_stable_and_short() -> None:
    assert config_hash(CONFIG) == config_hash(copy.deepcopy(CONFIG))
    assert len(config_hash(CONFIG)) == 16
    reordered = dict(reversed(list(CONFIG.items())))
    assert config_hash(reordered) == config_hash(CONFIG)


@pytest.mark.parametrize("dotted, value", [
    ("paths.run_dir", "elsewhere"), ("paths.cache_dir", "b"), ("backbone.cache_dir", "b"),
    ("progress", False), ("backbone.progress", False), ("objective", "avg"), ("resume", False),
    ("logger._target_", "mmke.loggers.csv.CsvLogger"), ("logger.mode", "offline"),
    ("hydra.job.num", 3),
])
def test_settings_that_do_not_change_results_do_not_change_the_hash(dotted, value) -> None:
    assert config_hash(changed(dotted, value)) == config_hash(CONFIG)


@pytest.mark.parametrize("dotted, value", [
    ("editor.lr", 0.01), ("editor.layers", [-1]), ("seed", 1), ("n_edits", 49),
    ("backbone.device", "cpu"), ("protocol.T", 5),
])
def test_settings_that_change_results_change_the_hash(dotted, value) -> None:
    assert config_hash(changed(dotted, value)) != config_hash(CONFIG)


def test_equal_numbers_in_different_spellings_hash_alike() -> None:
    assert config_hash(changed("editor.lr", 5e-3)) == config_hash(CONFIG)


def test_identity_config_drops_only_the_ignored_keys() -> None:
    ident = identity_config(CONFIG)
    assert set(ident) == {"backbone", "editor", "seed", "n_edits"}
    assert ident["backbone"] == {"name": "tiny", "device": "auto"}


def finished(folder: Path, identity: str | None) -> Path:
    w = RunWriter(folder)
    w.write_config({"seed": 0})
    w.finish({"rel": 1.0} if identity is None else {"rel": 1.0, HASH_KEY: identity})
    return folder


def test_find_finished_run(tmp_path: Path) -> None:
    assert find_finished_run(tmp_path / "missing", "abc") is None
    finished(tmp_path / "0", "aaa")
    finished(tmp_path / "1", "bbb")
    finished(tmp_path / "2", None)  # a run from before hashes were stored
    finished(tmp_path / ".hydra" / "x", "ccc")  # hidden folders are not searched
    crashed = RunWriter(tmp_path / "3")
    crashed.write_config({"seed": 0})
    crashed.add_edit({"rel": 1.0})
    crashed.close()
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "summary.json").write_text("{not json")
    assert find_finished_run(tmp_path, "bbb") == tmp_path / "1"
    assert find_finished_run(tmp_path, "bbb", first=tmp_path / "3") == tmp_path / "1"
    assert find_finished_run(tmp_path, "bbb", first=tmp_path / "1") == tmp_path / "1"
    assert find_finished_run(tmp_path, "ccc") is None
    assert find_finished_run(tmp_path, "zzz") is None
    # a single run looks only in its own folder
    assert find_finished_run(tmp_path / "0", "aaa", first=tmp_path / "0") == tmp_path / "0"
    assert find_finished_run(tmp_path / "3", "aaa", first=tmp_path / "3") is None
