"""The papers' figures (and ASAM's sensitivity tables) drawn from our runs, as PNG and PDF.

Sensitivity figures (ODEdit Figures 2 and 4, ASAM Tables 6-7, M-ORE Figures 11-12) put one
swept setting on the x axis (categories in numeric order, so ``adaptive`` or a single value
still draws) and one panel per metric; each line is one configuration (backbone, task, editor,
reg, protocol, T and the paper's other settings; leaky runs apart, "(leaky: …)" in the legend),
with mean ± std over seeds. A setting is read from the run config through
``mmke.tables.papers.setting_keys``.

M-ORE Figure 5 draws general-capability probe accuracy (``probes.jsonl``) against the edit
index, one panel per category, one line per editor. M-ORE Figure 7 draws per-edit latency (raw and rolling mean) and per-edit peak memory against
the edit index, one line per run.

Every figure function takes runs (a frame or folders) and an output folder, draws what exists,
and returns the paths written; with nothing to draw it warns and returns ``[]``. Figures are
drawn on ``matplotlib.figure.Figure`` objects (Agg canvas), never through pyplot's global
state, so importing this module changes no backend.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmke.evaluation.names import PAPER_COLUMNS, column_label
from mmke.results.load import load_probes
from mmke.tables.errors import UnknownTableError
from mmke.tables.matching import norm_name, protocol_key, run_task
from mmke.tables.papers import PAPERS, SETTING_LABELS, setting_keys
from mmke.tables.runs import RunsLike, as_edit_rows, as_runs, config_value, leaked_text
from mmke.tables.stats import mean_std, per_seed

OutLike = str | os.PathLike[str]
#: Per-edit peak memory fields, preferred first.
PEAK_MEMORY_FIELDS: tuple[str, ...] = ("incremental_mem_mb", "delta_peak_mem_mb", "peak_mem_mb")
ROLLING_WINDOW = 10


class NothingToDraw(UserWarning):
    """A figure was asked for, but no run has what it plots."""


@dataclass(frozen=True)
class SweepFigure:
    """A sensitivity figure: ``params`` (setting names, one row of panels each) against
    ``metrics`` (one column of panels each)."""

    paper: str
    name: str
    title: str
    params: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.paper}.{self.name}"


SWEEPS: dict[str, SweepFigure] = {f.id: f for f in (
    SweepFigure("odedit", "figure2", "ODEdit Fig. 2: TV-ℓ1 penalty strength λ", ("lambda",),
                PAPER_COLUMNS["odedit"]),
    SweepFigure("odedit", "figure4", "ODEdit Fig. 4: IRM-TV learning rate and depth",
                ("lr", "depth"), PAPER_COLUMNS["odedit"]),
    SweepFigure("asam", "table6", "ASAM Table 6: perturbation budget ε", ("eps",),
                PAPER_COLUMNS["asam"]),
    SweepFigure("asam", "table7", "ASAM Table 7: alignment weight β and temperature τ",
                ("beta", "tau"), PAPER_COLUMNS["asam"]),
    SweepFigure("more", "figure11", "M-ORE Fig. 11: LoRA rank r", ("rank",),
                PAPER_COLUMNS["more"]),
    SweepFigure("more", "figure12", "M-ORE Fig. 12: regularization weight λ", ("lambda",),
                PAPER_COLUMNS["more"]),
)}


def sweep_figure(spec: SweepFigure, runs: RunsLike, out: OutLike) -> list[Path]:
    """Draw sensitivity figure ``spec`` from the runs that have its settings."""
    frame = as_runs(runs)
    # Every setting the paper sweeps, so that runs differing in one never pool into a point.
    names = list(dict.fromkeys([*spec.params, *PAPERS[spec.paper].settings]))
    values = {p: _setting_values(frame, spec.paper, p) for p in names}
    if all(values[p].isna().all() for p in spec.params):
        keys = "; ".join(f"{p}: {', '.join(setting_keys(spec.paper, p))}" for p in spec.params)
        return _nothing(spec.id, f"no run has the swept setting(s) (config keys {keys})")
    fig = Figure(figsize=(3.1 * len(spec.metrics), 2.7 * len(spec.params) + 0.6),
                 layout="constrained")
    axes = fig.subplots(len(spec.params), len(spec.metrics), squeeze=False)
    for i, param in enumerate(spec.params):
        others = [p for p in names if p != param]
        _sweep_row(axes[i], frame, values, param, others, spec)
    fig.suptitle(f"{spec.title} (ours)")
    return _save(fig, out, spec.id)


def more_figure7(runs: RunsLike, out: OutLike) -> list[Path]:
    """M-ORE Figure 7: per-edit latency (raw and rolling mean over ``ROLLING_WINDOW`` edits)
    and per-edit peak memory against the edit index, one line per run.

    Memory comes from the per-edit field ``incremental_mem_mb`` (``mmke.cost``: the peak over
    the memory in use before the first edit, what M-ORE plots), ``delta_peak_mem_mb`` or
    ``peak_mem_mb``; runs that recorded none of them get a note in that panel instead of a line.
    """
    edits = as_edit_rows(runs)
    if edits.empty or "edit_s" not in edits.columns or edits["edit_s"].isna().all():
        return _nothing("more.figure7", "no per-edit rows with edit_s")
    memory_field = next((f for f in PEAK_MEMORY_FIELDS
                         if f in edits.columns and edits[f].notna().any()), None)
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax_time, ax_mem = fig.subplots(2, 1, sharex=True)
    groups = list(edits.groupby("run_dir", sort=True)) if "run_dir" in edits.columns \
        else [("", edits)]
    labels = _run_labels([g for _, g in groups])
    for i, ((_, rows), label) in enumerate(zip(groups, labels)):
        color = f"C{i % 10}"
        t = rows["index"].to_numpy() if "index" in rows.columns else np.arange(len(rows))
        order = np.argsort(t, kind="stable")
        t = t[order]
        latency = rows["edit_s"].to_numpy(dtype=float)[order] * 1000.0
        ax_time.plot(t, latency, color=color, alpha=0.3, linewidth=0.8)
        rolling = pd.Series(latency).rolling(ROLLING_WINDOW, min_periods=1).mean()
        ax_time.plot(t, rolling, color=color, linewidth=1.8, marker="o" if len(t) == 1 else None,
                     label=label)
        if memory_field is not None:
            memory = rows[memory_field].to_numpy(dtype=float)[order]
            if np.isfinite(memory).any():
                ax_mem.plot(t, memory, color=color, linewidth=1.4,
                            marker="o" if len(t) == 1 else None, label=label)
    ax_time.set_ylabel("edit latency (ms)")
    ax_time.set_title("raw (faint) and rolling mean")
    ax_time.legend(fontsize="small")
    if memory_field is None:
        ax_mem.text(0.5, 0.5, "no per-edit peak memory (peak_mem_mb) in these runs",
                    ha="center", va="center", transform=ax_mem.transAxes)
        ax_mem.set_yticks([])
    else:
        ax_mem.set_ylabel(f"{memory_field} (MB)")
    ax_mem.set_xlabel("edit index t")
    ax_mem.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("M-ORE Fig. 7: editor efficiency over the edit sequence (ours)")
    return _save(fig, out, "more.figure7")


def more_figure5(runs: RunsLike, out: OutLike) -> list[Path]:
    """M-ORE Figure 5: probe accuracy (``eval.probes``) against the edit index t (edits of the
    stream the model holds; 0: unedited), one panel per category, one line per editor (one per
    run configuration when several differ), the mean over streams and seeds at each t."""
    frame = as_runs(runs)
    folders = sorted(set(frame["run_dir"].astype(str))) if "run_dir" in frame.columns else []
    probes = load_probes(folders) if folders else pd.DataFrame()
    if probes.empty:
        return _nothing("more.figure5", "no run has probes.jsonl (run with eval.probes=miniworld "
                                        "or eval.probes=mme)")
    categories = list(dict.fromkeys(probes["category"]))
    groups = list(probes.groupby("run_dir", sort=True))
    labels = _run_labels([g for _, g in groups])
    by_label: dict[str, list[pd.DataFrame]] = {}
    for (_, rows), label in zip(groups, labels):
        # seeds of one editor share a line: strip the seed that _run_labels adds to tell them apart
        by_label.setdefault(label.split(" seed ")[0], []).append(rows)
    cols = 3 if len(categories) > 4 else min(2, len(categories))  # 2x2 for the four mini ones
    n_rows = -(-len(categories) // cols)
    fig = Figure(figsize=(3.3 * cols, 2.8 * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
    for ax, category in zip(axes, categories):
        for i, (label, parts) in enumerate(by_label.items()):
            rows = pd.concat(parts)
            curve = rows[rows["category"] == category].groupby("edits")["accuracy"].mean()
            ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3, color=f"C{i % 10}",
                    label=label)
        ax.set_title(category)
        ax.set_xlabel("edit index t")
        ax.set_ylabel("accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(categories):]:
        ax.set_axis_off()
    axes[0].legend(fontsize="x-small")
    fig.suptitle("M-ORE Fig. 5: general capability after edits (ours)")
    return _save(fig, out, "more.figure5")


def _sweep_figure_function(fig_id: str) -> Callable[[RunsLike, OutLike], list[Path]]:
    spec = SWEEPS[fig_id]

    def draw(runs: RunsLike, out: OutLike) -> list[Path]:
        return sweep_figure(spec, runs, out)

    draw.__name__ = fig_id.replace(".", "_")
    draw.__doc__ = f"{spec.title}: see ``sweep_figure``."
    return draw


odedit_figure2 = _sweep_figure_function("odedit.figure2")
odedit_figure4 = _sweep_figure_function("odedit.figure4")
asam_table6 = _sweep_figure_function("asam.table6")
asam_table7 = _sweep_figure_function("asam.table7")
more_figure11 = _sweep_figure_function("more.figure11")
more_figure12 = _sweep_figure_function("more.figure12")

#: Every figure by id.
FIGURES: dict[str, Callable[[RunsLike, OutLike], list[Path]]] = {
    "odedit.figure2": odedit_figure2,
    "odedit.figure4": odedit_figure4,
    "asam.table6": asam_table6,
    "asam.table7": asam_table7,
    "more.figure5": more_figure5,
    "more.figure7": more_figure7,
    "more.figure11": more_figure11,
    "more.figure12": more_figure12,
}


def make_figure(fig_id: str, runs: RunsLike, out: OutLike) -> list[Path]:
    """Draw figure ``fig_id`` (e.g. ``odedit.figure2``); ``UnknownTableError`` lists the ids."""
    if fig_id not in FIGURES:
        raise UnknownTableError(f"unknown figure {fig_id}; available figures: "
                                f"{', '.join(FIGURES)}")
    return FIGURES[fig_id](runs, out)


def _sweep_row(axes: np.ndarray, frame: pd.DataFrame, values: dict[str, pd.Series],
               param: str, others: list[str], spec: SweepFigure) -> None:
    have = values[param].notna()
    xlabel = SETTING_LABELS.get(param, param)
    if not have.any():
        for ax in axes:
            ax.set_axis_off()
        axes[0].text(0.0, 0.5, f"no run has setting {param}\n(config keys "
                     f"{', '.join(setting_keys(spec.paper, param))})", va="center",
                     transform=axes[0].transAxes)
        return
    runs = frame[have]
    x = values[param][have].map(str)
    categories = sorted(set(x), key=_numeric_first)
    configs = pd.Series([_config_key(run, {p: values[p].get(i) for p in others})
                         for i, run in runs.iterrows()], index=runs.index)
    labels = _config_labels(list(dict.fromkeys(configs)))
    for ax, metric in zip(axes, spec.metrics):
        for j, (config, label) in enumerate(labels.items()):
            pos, mean, err = [], [], []
            for k, category in enumerate(categories):
                cell = mean_std(per_seed(runs[(configs == config) & (x == category)], metric))
                if not math.isnan(cell.mean):
                    pos.append(k)
                    mean.append(cell.mean)
                    err.append(0.0 if math.isnan(cell.std) else cell.std)
            if pos:
                ax.errorbar(pos, mean, yerr=err, marker="o", capsize=3, color=f"C{j % 10}",
                            label=label)
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
        ax.set_xlabel(xlabel)
        ax.set_title(column_label(metric))
        ax.grid(alpha=0.3)
    if axes[-1].get_legend_handles_labels()[0]:  # one legend per row: its lines' labels
        axes[-1].legend(fontsize="x-small")


def _setting_values(frame: pd.DataFrame, paper: str, param: str) -> pd.Series:
    keys = setting_keys(paper, param)
    return pd.Series([config_value(run, keys) for _, run in frame.iterrows()],
                     index=frame.index, dtype=object)


def _config_key(run: pd.Series, others: dict[str, object]) -> tuple:
    protocol, T = protocol_key(run.get("protocol"), run.get("T"))
    extra = tuple(f"{p}={v}" for p, v in others.items() if v is not None and not pd.isna(v))
    reg = norm_name(run.get("reg")) or "none"
    leaked = leaked_text(run)
    if leaked:  # a leaky run draws its own line, never a point pooled with clean runs
        reg = f"{reg} (leaky: {leaked})"
    return (str(run.get("backbone")), run_task(run), str(run.get("editor")), reg, protocol, T,
            *extra)


def _config_labels(configs: list[tuple]) -> dict[tuple, str]:
    """Legend labels naming only what differs between the lines (editor+reg when one line)."""
    if len(configs) == 1:
        c = configs[0]
        return {c: f"{c[2]}+{c[3]}" if c[3] != "none" else c[2]}
    width = max(len(c) for c in configs)
    varying = [i for i in range(width) if len({c[i] if i < len(c) else None for c in configs}) > 1]
    names = ("", "", "", "", "", "T=")
    out = {}
    for c in configs:
        parts = [f"{names[i] if i < len(names) else ''}{c[i]}" for i in varying if i < len(c)]
        out[c] = " ".join(parts) or f"{c[2]}+{c[3]}"
    return out


def _run_labels(groups: list[pd.DataFrame]) -> list[str]:
    """Legend labels of per-run lines: editor(+reg), plus backbone/seed when they differ."""
    def field(rows: pd.DataFrame, name: str) -> str:
        return str(rows[name].iloc[0]) if name in rows.columns else ""

    base = []
    for rows in groups:
        editor, reg = field(rows, "editor"), field(rows, "reg")
        base.append(editor if reg in ("", "none", "None") else f"{editor}+{reg}")
    labels = []
    for i, rows in enumerate(groups):
        label = base[i]
        if len({field(g, "backbone") for g in groups}) > 1:
            label += f" {field(rows, 'backbone')}"
        if base.count(base[i]) > 1:
            label += f" seed {field(rows, 'seed')}"
        labels.append(label)
    return labels


def _numeric_first(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _nothing(fig_id: str, why: str) -> list[Path]:
    warnings.warn(f"{fig_id}: nothing to draw: {why}", NothingToDraw, stacklevel=3)
    return []


def _save(fig: Figure, out: OutLike, stem: str) -> list[Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths
