"""The documentation: the site builds with ``mkdocs build --strict`` (no broken link, no page
missing from the nav), and every ``python run.py`` command shown in the README or the docs runs
on the tiny default, cut to two edits (and two fit steps for a trained editor), or is marked as
needing real weights. A sweep (``-m``) composes every one of its jobs and runs the first."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from mmke.runner import run
from tests.conftest import ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: the marker a command that cannot run on the tiny default carries (a trailing comment)
REAL_MARK = "needs real weights"
#: overrides that name real weights or real data: such a command needs no marker
REAL = re.compile(r"(^|\s)(backbone=(blip2|minigpt4|llava|qwen2vl)\b|data=(mmedit|vlkeb)\w*"
                  r"|data\.root=|backbone\.path=)")
LAUNCHER = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:python|accelerate launch|torchrun)\b.*?\brun\.py\b")


@dataclass(frozen=True)
class Command:
    where: str
    text: str
    marked: bool

    @property
    def real(self) -> bool:
        return self.marked or bool(REAL.search(self.text))

    def overrides(self) -> tuple[bool, list[str]]:
        """``(multirun, overrides)`` of the command line, launcher options left out."""
        words = shlex.split(self.text.split(" #")[0])
        after = words[next(i for i, w in enumerate(words) if w.endswith("run.py")) + 1:]
        multirun = any(w in ("-m", "--multirun") for w in after)
        return multirun, [w for w in after if not w.startswith("-")]


def shown_commands() -> list[Command]:
    """Every ``run.py`` command of a code block (continuation lines joined) or an inline code
    span in the README and the docs."""
    found = []
    for path in DOC_FILES:
        where = path.relative_to(ROOT).as_posix()
        in_code, pending = False, ""
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code, pending = not in_code, ""
                continue
            if in_code:
                text = (pending + " " + line.strip()).strip() if pending else line.strip()
                if text.endswith("\\"):
                    pending = text[:-1]
                    continue
                pending = ""
                if LAUNCHER.match(text):
                    found.append(Command(f"{where}:{number}", text, REAL_MARK in text))
            else:
                for span in re.findall(r"`([^`]+)`", line):
                    if LAUNCHER.match(span.strip()):
                        found.append(Command(f"{where}:{number}", span.strip(), REAL_MARK in line))
    return found


def template(command: Command) -> bool:
    """A pattern, not a command: ``editor=<e>``, ``tiny_<family>``, ``...``."""
    return "<" in command.text.split(" #")[0] or "..." in command.text


def runnable() -> list[Command]:
    """The tiny-default commands, each distinct command line once (the README and a page often
    show the same one): the first place it is shown names it."""
    seen: dict[tuple, Command] = {}
    for command in shown_commands():
        if not command.real and not template(command):
            multirun, overrides = command.overrides()
            seen.setdefault((multirun, *overrides), command)
    return list(seen.values())


COMMANDS = runnable()


def jobs(overrides: list[str]) -> list[list[str]]:
    """A basic sweep's jobs: the product of every comma list (brackets kept whole)."""
    choices = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts = value.split(",") if "," in value and "[" not in value and "(" not in value \
            else [value]
        choices.append([f"{key}={p}" for p in parts] if value else [item])
    return [list(job) for job in itertools.product(*choices)]


def cut_short(overrides: list[str]) -> list[str]:
    """The command's own overrides, run settings left out, then two edits (streams of two)."""
    kept = [o for o in overrides if not o.startswith(("hydra", "n_edits=", "protocol.T="))]
    cfg = compose_config(kept)
    short = [*kept, "n_edits=2", "progress=false"]
    if cfg.protocol.get("T", 1) > 1:  # a stream: two edits in one
        short.append("protocol.T=2")
    if "training" in cfg.editor:
        short += ["editor.training.steps=2", "editor.training.batch_size=2"]
    return short


def test_the_docs_show_commands_and_mark_the_real_ones():
    every = shown_commands()
    assert len(COMMANDS) >= 20, [c.text for c in COMMANDS]
    assert any(c.real for c in every)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_a_command_shown_in_the_docs_runs_on_the_tiny_default(command, tmp_path):
    multirun, overrides = command.overrides()
    sweep = jobs(overrides) if multirun else [overrides]
    for job in sweep:  # every job of a sweep composes
        OmegaConf.to_container(compose_config([o for o in job if not o.startswith("hydra")]),
                               resolve=False)
    cfg = compose_config(cut_short(sweep[0]))
    summary = run(cfg, tmp_path / "run")
    assert summary.get("n_edits", 0) >= 1 or "fit" in summary, (command.where, summary)


def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "editors" / "wise" / "index.html").is_file()
