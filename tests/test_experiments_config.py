"""The experiment configs behind the papers' tables (``conf/experiment/<paper>/<table>.yaml``):
each composes, sweeps what its table varies over options that exist, and runs; the methods
mmke does not have yet stop a run with a clear message."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mmke.config import build
from mmke.errors import MMKEError
from mmke.planned import TARGET, available_options, planned
from tests.conftest import CONF, ROOT, cache_dir

EXPERIMENT_DIR = CONF / "experiment"
EXPERIMENTS = sorted(p.relative_to(EXPERIMENT_DIR).with_suffix("").as_posix()
                     for p in EXPERIMENT_DIR.rglob("*.yaml"))
TABLES = ([f"odedit/table{i}" for i in range(1, 7)] + [f"asam/table{i}" for i in range(1, 9)]
          + [f"more/table{i}" for i in range(1, 5)])
#: Config groups a sweep may choose from (the other sweep keys are values inside the config).
GROUPS = {"backbone", "data", "editor", "reg", "protocol", "eval", "logger"}
#: Backbones the tables name that are being added to conf/backbone/ (a missing one is tolerated).
COMING_BACKBONES = {"minigpt4", "llava", "qwen2vl"}
PLACEHOLDERS = sorted((p.parent.name, p.stem) for group in ("editor", "reg", "protocol")
                      for p in (CONF / group).glob("*.yaml") if TARGET in p.read_text())
#: a placeholder editor config, for the tests of the mechanism once no real one is left
PLACEHOLDER_YAML = (f"# PLACEHOLDER, a test's own.\n_target_: {TARGET}\nkind: editor\n"
                    "name: coming\nmethod: Coming\npaper: a test\n")


def compose_experiment(name: str, overrides: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={name}", *overrides],
                       return_hydra_config=True)


def sweep_params(name: str) -> dict[str, list[str]]:
    """The experiment's ``hydra.sweeper.params``, each value list parsed as Hydra parses it."""
    params = compose_experiment(name).hydra.sweeper.params
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        (override,) = parser.parse_overrides([f"{key}={value}"])
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        out[str(key)] = values
    return out


def exists(group: str, option: str) -> bool:
    return (CONF / group / f"{option}.yaml").is_file()


def cell(name: str, pick: int) -> list[str]:
    """Overrides selecting one cell of the sweep: value ``pick`` (0 first, -1 last) of every
    key, skipping options of groups not in conf/ yet."""
    overrides = []
    for key, values in sweep_params(name).items():
        value = values[pick]
        if key in GROUPS and not exists(key, value):
            value = next((v for v in values if exists(key, v)), None)
            if value is None:
                continue
        overrides.append(f"{key}={value}")
    return overrides


def test_one_config_per_table():
    assert set(TABLES) <= set(EXPERIMENTS)


def test_every_published_table_has_a_config():
    for paper in ("odedit", "asam", "more"):
        with open(ROOT / "experiments" / "published" / f"{paper}.csv", encoding="utf-8") as f:
            tables = {row["table"] for row in csv.DictReader(f)}
        for table in tables:
            assert f"{paper}/{table}" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_header_names_the_command(name):
    lines = (EXPERIMENT_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# @package _global_"
    assert any(f"python run.py -m +experiment={name}" in line
               for line in lines if line.startswith("#"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_sweep_params_are_present_and_exist(name):
    params = sweep_params(name)
    assert "seed" in params, "every table says how many seeds it averages"
    for key, values in params.items():
        assert values, key
        if key in GROUPS:
            for value in values:
                assert exists(key, value) or (key == "backbone" and value in COMING_BACKBONES), \
                    f"{name}: {key}={value} has no conf/{key}/{value}.yaml"


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("pick", [0, -1], ids=["first", "last"])
def test_a_sweep_cell_composes(name, pick):
    overrides = cell(name, pick)
    cfg = compose_experiment(name, tuple(overrides))
    for override in overrides:
        key, value = override.split("=", 1)
        if key in GROUPS:
            assert cfg[key].name == value, override
        else:
            assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", \
                f"{name}: swept key {key} is not in the composed config"


def test_command_line_overrides_win_over_the_sweep():
    """What the tiny commands in the headers rely on: a plain override replaces a swept key."""
    cfg = compose_experiment("odedit/table2", ("backbone=tiny_blip2", "protocol.T=2"))
    assert cfg.backbone.name == "tiny_blip2" and cfg.protocol.T == 2
    assert cfg.protocol.name == "sequential"


# ----------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize("group, name", PLACEHOLDERS, ids=[f"{g}={n}" for g, n in PLACEHOLDERS])
def test_placeholders_raise_a_clear_error(group, name):
    text = (CONF / group / f"{name}.yaml").read_text(encoding="utf-8")
    assert text.startswith("# PLACEHOLDER"), "say it in the header"
    node = OmegaConf.load(CONF / group / f"{name}.yaml")
    assert node.name == name
    kwargs = {"regularizer": object()} if group == "editor" else {}
    with pytest.raises(MMKEError) as err:
        build(node, **kwargs)
    message = str(err.value)
    assert f"{group}={name}" in message and "not implemented" in message
    assert f"conf/{group}/{name}.yaml" in message


def test_available_options_leave_out_placeholders(tmp_path):
    editors = available_options("editor")
    assert {"ft", "none"} <= set(editors)
    assert {"wise", "mend", "unike"} <= set(editors)
    assert available_options("no_such_group") == []
    # a placeholder is left out (the papers' placeholders get implemented one by one, so the
    # check builds its own)
    (tmp_path / "editor").mkdir()
    (tmp_path / "editor" / "made.yaml").write_text("_target_: mmke.editors.ft.FineTune\n")
    (tmp_path / "editor" / "coming.yaml").write_text(PLACEHOLDER_YAML)
    assert available_options("editor", tmp_path) == ["made"]


def test_planned_names_method_paper_and_alternatives():
    with pytest.raises(MMKEError, match=r"editor=unike \(UniKE\) is not implemented"
                                        r".*ODEdit Table 1.*Available editor options: .*ft"):
        planned("editor", "unike", "ODEdit Table 1", method="UniKE", regularizer=None, lr=0.1)


def run_cli(*overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMKE_CACHE_DIR": str(cache_dir()), "PYTHONUNBUFFERED": "1"}
    flags = ["-m"] if multirun else []  # Hydra's flags go before the overrides
    return subprocess.run([sys.executable, "run.py", *flags, "progress=false", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_placeholder_editor_stops_the_run(tmp_path, pretrained):
    """A placeholder config (here one written for the test, on Hydra's search path) stops the
    run before anything is edited, naming itself."""
    (tmp_path / "conf" / "editor").mkdir(parents=True)
    (tmp_path / "conf" / "editor" / "coming.yaml").write_text(PLACEHOLDER_YAML)
    proc = run_cli(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "editor=coming",
                   "debug=default", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "editor=coming" in proc.stderr and "not implemented in mmke yet" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_tiny_cell_of_a_table_runs(tmp_path, pretrained):
    sweep = tmp_path / "sweep"
    proc = run_cli("+experiment=odedit/table1", "backbone=tiny_blip2", "data=mini_vqa",
                   "editor=ft", "reg=none", "seed=0", "n_edits=2", f"hydra.sweep.dir={sweep}",
                   multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0"], "the command-line values replace the table's sweep: one job"
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["n_edits"] == 2 and summary["n_failed"] == 0
    config = OmegaConf.load(sweep / "0" / "config.yaml")
    assert (config.backbone.name, config.editor.name, config.reg.name, config.data.name) == \
        ("tiny_blip2", "ft", "none", "mini_vqa")
