"""A logger that reports a run to Weights & Biases (offline by default).

What a W&B run gets: the resolved config; each edit's metrics as it comes (``step`` = the edit
index); the summary; the table of all edit rows (``edits``); any figures given. Its group is the
sweep (or the ``group`` setting) and its tags name the backbone, editor, regularizer, task and
protocol, so a sweep's runs can be compared side by side in the W&B interface.

W&B is a side channel: the run folder is the result. So nothing W&B does may end a run. A
missing package, a failing ``wandb.init`` (bad settings, no network in online mode) or a failing
``log`` is reported once as a warning, W&B logging stops for that run, and the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mmke.loggers.base import RunLogger
from mmke.results.atomic import to_jsonable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: (tag prefix, dotted config key) of the tags every run gets, e.g. ``editor:ft``.
TAG_KEYS: tuple[tuple[str, str], ...] = (
    ("backbone", "backbone.name"), ("editor", "editor.name"), ("reg", "reg.name"),
    ("task", "data.task"), ("protocol", "protocol.name"))


def run_tags(config: dict[str, Any]) -> list[str]:
    """``<prefix>:<value>`` for each of ``TAG_KEYS`` the config has."""
    tags = []
    for prefix, dotted in TAG_KEYS:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            tags.append(f"{prefix}:{node}")
    return tags


class WandbLogger(RunLogger):
    """Logs to W&B. ``conf/logger/wandb.yaml`` holds the settings:

    ``project``/``entity`` as in ``wandb.init``; ``mode`` ``offline`` (default; upload later with
    ``wandb sync``), ``online`` or ``disabled``; ``group`` (None: the sweep the run is a job of);
    extra ``tags``; ``name`` (None: the run folder's name); ``dir`` (None: the run folder, so
    the W&B files sit beside the results).
    """

    def __init__(self, project: str = "mmke", entity: str | None = None,
                 mode: str = "offline", group: str | None = None, tags: Sequence[str] = (),
                 name: str | None = None, dir: str | None = None, job_type: str = "edit") -> None:
        self.project, self.entity, self.mode = project, entity, mode
        self.group, self.tags, self.name = group, list(tags), name
        self.dir, self.job_type = dir, job_type
        self._run: Any = None
        self._failed = False
        self._rows: list[dict[str, Any]] = []
        self._summary: dict[str, Any] | None = None
        self._last_step = -1

    def start(self, config: dict[str, Any], run_dir: Path, sweep: str | None = None) -> None:
        self._rows, self._summary, self._last_step, self._failed = [], None, -1, False
        self._run = self._safely("init", lambda: self._init(config, Path(run_dir), sweep))

    def log_edit(self, index: int, row: dict[str, Any]) -> None:
        row = {"index": index, **to_jsonable(dict(row))}
        self._rows.append(row)
        numbers = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # W&B steps must increase; rows gathered from other processes may come out of order.
        step = index if index > self._last_step else None
        self._last_step = max(self._last_step, index)
        self._with_run("log", lambda run: run.log(numbers, step=step))

    def log_summary(self, summary: dict[str, Any]) -> None:
        # Kept for finish: W&B sets a key's summary to its last logged value whenever a history
        # row is committed, so the run's own summary must be written after the last row.
        self._summary = to_jsonable(dict(summary))

    def log_figure(self, name: str, figure: Any) -> None:
        def log_image(run: Any) -> None:
            import wandb

            run.log({name: wandb.Image(figure)})

        self._with_run("figure", log_image)

    def finish(self) -> None:
        self._with_run("table", self._log_table)
        if self._summary is not None:
            summary = self._summary
            self._with_run("summary", lambda run: run.summary.update(summary))
        run, self._run = self._run, None
        if run is not None:
            # Called even after a failure, so that W&B's service process is released.
            self._safely("finish", run.finish, force=True)

    def _init(self, config: dict[str, Any], run_dir: Path, sweep: str | None) -> Any:
        import wandb

        folder = Path(self.dir) if self.dir else run_dir
        folder.mkdir(parents=True, exist_ok=True)
        # console="off": Hydra already captures the console; no system-metrics sampling, git
        # or code capture: the run folder's meta.json records provenance.
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                  disable_git=True, save_code=False, disable_job_creation=True)
        return wandb.init(project=self.project, entity=self.entity, mode=self.mode,
                          group=self.group or sweep, tags=[*run_tags(config), *self.tags],
                          name=self.name or run_dir.name, job_type=self.job_type,
                          dir=str(folder), config=config, settings=settings)

    def _log_table(self, run: Any) -> None:
        import wandb

        columns = list(dict.fromkeys(k for row in self._rows for k in row))
        data = [[row.get(c) for c in columns] for row in self._rows]
        run.log({"edits": wandb.Table(columns=columns, data=data)})

    def _with_run(self, what: str, action: Callable[[Any], None]) -> None:
        if self._run is not None:
            run = self._run
            self._safely(what, lambda: action(run))

    def _safely(self, what: str, action: Callable[[], T], force: bool = False) -> T | None:
        """``action()``, or None when it raises (or an earlier call did): warn once, go on."""
        if self._failed and not force:
            return None
        try:
            return action()
        except Exception as err:  # any failure of W&B; the run must go on
            if not self._failed:
                log.warning("wandb %s failed (%s: %s); W&B logging is off for the rest of this "
                            "run, and the run folder still gets every result",
                            what, type(err).__name__, err)
            self._failed = True
            return None
