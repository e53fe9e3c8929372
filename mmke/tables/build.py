"""``build_table``: one of the papers' tables, ours beside theirs.

The layout comes from the published CSV of that table: one output row per distinct
(backbone, task, editor, reg, protocol, T, setting, row_label), in the paper's order, and one
group of columns per metric. For metric ``m`` the columns are

    m.paper, m.paper_std      the published value (and ± where printed)
    m.ours, m.ours_std, m.n   mean and sample std over seeds of the matching runs, #seeds
    m.p                       paired t-test p-value (only where the paper claims significance)

Missing cells stay NaN (shown as "–"), never 0. Each row also says which of our backbones the
numbers came from (``ours_backbone``) and whether that was a tiny model (``tiny``).

Leaky runs (their summary says ``leaky: true``: a setting let the edits see the evaluated
record's own rephrase or locality prompts, e.g. ODEdit ``neighbours=record_rephrase``) never
pool with the other runs of a row: the published row takes the clean runs only, and each
distinct set of leaked prompts gets a row of its own right after it, labelled
"<label> (leaky: <what leaked>)" with ``leaked`` filled in, the paper's numbers repeated beside
it, and a warning.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pandas as pd

from mmke.evaluation.names import (ALL_METRIC_LABELS, COST_METRICS, DERIVED_METRICS,
                                   PAPER_COLUMNS, RELATIVE_METRICS, greedy_column, order_columns)
from mmke.tables.errors import UnknownTableError
from mmke.tables.matching import RowKey, backbone_family, is_tiny, norm_name, run_task
from mmke.tables.papers import PAPERS, setting_keys
from mmke.tables.published import ROW_KEYS, PublishedLike, table_rows
from mmke.tables.runs import RunsLike, as_runs, config_value, leaked_text
from mmke.tables.stats import Cell, mean_std, paired_difference, paired_ttest, per_seed

#: Per-row columns after the ROW_KEYS (``leaked``: what a leaky row's runs saw, else "").
ROW_INFO: tuple[str, ...] = ("ours_backbone", "tiny", "n_runs", "seeds", "leaked")


def leaky_label(label: str, leaked: str) -> str:
    """The row label of leaky runs: ``FT+ODEdit`` -> ``FT+ODEdit (leaky: t_gen)``."""
    return f"{label} (leaky: {leaked})"


ANSWERS = ("teacher_forced", "greedy", "both")


def build_table(paper: str, table: str, runs: RunsLike, *, published: PublishedLike = None,
                significance: bool | None = None, answers: str = "teacher_forced") -> pd.DataFrame:
    """Paper ``paper``'s table ``table`` with our runs beside the published numbers.

    ``runs``: a runs frame (``load_table_runs``/``load_summaries`` output, or hand-made with
    the same columns) or folders holding run folders. ``published``: the folder of the
    published CSVs (default ``experiments/published``), a CSV file, or a DataFrame.
    ``significance``: None tests where the paper claims significance, True every row with a
    regularizer (alpha 0.05 unless the paper gives one), False nowhere. ``answers``: the
    teacher-forced metrics (the papers'), their greedy generated-answer counterparts
    (``eval.mode=generate``/``both`` runs; no published value), or both side by side.
    """
    if paper not in PAPERS:
        raise UnknownTableError(f"unknown table {paper}.{table}: unknown paper {paper!r}; "
                                f"papers: {', '.join(PAPERS)}")
    rows = with_answers(table_rows(paper, table, published), answers)
    frame = as_runs(runs)
    alpha = PAPERS[paper].significance.get(table)
    if significance is not None:
        alpha = (alpha or 0.05) if significance else None
    return _assemble(paper, table, rows, frame, alpha)


def with_answers(rows: pd.DataFrame, answers: str) -> pd.DataFrame:
    """Published rows with each metric's greedy counterpart instead of it (``greedy``) or
    beside it (``both``); a greedy cell has no published value."""
    if answers not in ANSWERS:
        raise ValueError(f"answers={answers!r} is not one of {ANSWERS}")
    if answers == "teacher_forced":
        return rows
    greedy = rows[rows["metric"].map(lambda m: greedy_column(m) is not None)].copy()
    greedy["metric"] = greedy["metric"].map(greedy_column)
    greedy[["value", "std"]] = math.nan
    kept = rows if answers == "both" else rows[rows["metric"].map(greedy_column).isna()]
    return pd.concat([kept, greedy], ignore_index=True)


def runs_table(paper: str, runs: RunsLike, metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Our runs alone in ``paper``'s column layout (for when no published table applies): one
    row per distinct backbone family, task, editor, reg, protocol and T of the runs."""
    frame = as_runs(runs)
    metrics = metrics or PAPER_COLUMNS[paper]
    keys: dict[tuple, str] = {}
    for _, run in frame.iterrows():
        reg = norm_name(run.get("reg")) or "none"
        editor = str(run.get("editor") or "")
        T = run.get("T")
        key = (backbone_family(run.get("backbone")), run_task(run), editor, reg,
               str(run.get("protocol") or "single"), None if pd.isna(T) else int(T))
        keys.setdefault(key, editor if reg == "none" else f"{editor}+{reg}")
    records = [dict(table="ours", backbone=k[0], task=k[1], editor=k[2], reg=k[3],
                    protocol=k[4], T=k[5], setting="", row_label=label, metric=m,
                    value=math.nan, std=math.nan, note="")
               for k, label in keys.items() for m in metrics]
    rows = pd.DataFrame(records, columns=["table", *ROW_KEYS, "metric", "value", "std", "note"])
    return _assemble(paper, "ours", rows, frame, None)  # leaky runs get "(leaky: ...)" rows


def _assemble(paper: str, table: str, rows: pd.DataFrame, frame: pd.DataFrame,
              alpha: float | None) -> pd.DataFrame:
    metrics = order_columns(list(rows["metric"]))
    published = {(_row_id(r), r["metric"]): (r["value"], r["std"]) for _, r in rows.iterrows()}
    row_ids = list(dict.fromkeys(_row_id(r) for _, r in rows.iterrows()))
    setting_names = _setting_names(paper, rows)
    records = []
    for row_id in row_ids:
        fields = dict(zip(ROW_KEYS, row_id))
        key = RowKey.from_row(paper, fields)
        matched = key.select(frame)
        if matched.empty and not key.select(frame, with_requires=False).empty:
            warnings.warn(f"{paper}.{table} row {fields['row_label']!r}: runs with other metric "
                          f"definitions left out (the paper needs {_requires_text(paper)})",
                          stacklevel=3)
        # the published row takes the clean runs; each set of leaked prompts a row of its own
        for leaked, runs in _by_leak(matched, keep_clean=table != "ours"):
            shown = dict(fields)
            if leaked:
                shown["row_label"] = leaky_label(fields["row_label"], leaked)
                warnings.warn(f"{paper}.{table} row {fields['row_label']!r}: {len(runs)} leaky "
                              f"run(s) (their edits saw the evaluated record's {leaked}) shown "
                              f"apart as {shown['row_label']!r}, not pooled with the others",
                              stacklevel=3)
            _warn_pooled(paper, table, shown["row_label"], runs, setting_names)
            record = {**shown, **_row_info(runs), "leaked": leaked}
            for metric in metrics:
                value, std = published.get((row_id, metric), (math.nan, math.nan))
                cell = _cell(paper, key, metric, runs, frame, leaked)
                record.update({f"{metric}.paper": value, f"{metric}.paper_std": std,
                               f"{metric}.ours": cell.mean, f"{metric}.ours_std": cell.std,
                               f"{metric}.n": cell.n})
                if alpha:
                    record[f"{metric}.p"] = _p_value(key, metric, runs, frame)
            records.append(record)
    fields_per_metric = ("paper", "paper_std", "ours", "ours_std", "n") + (("p",) if alpha else ())
    columns = [*ROW_KEYS, *ROW_INFO, *(f"{m}.{f}" for m in metrics for f in fields_per_metric)]
    out = pd.DataFrame(records, columns=columns)
    out["T"] = out["T"].astype("Int64")
    out.attrs.update(paper=paper, table=table, metrics=metrics, alpha=alpha,
                     tiny=any(r["tiny"] is True for r in records),
                     leaky=any(r["leaked"] for r in records))
    return out


def _by_leak(matched: pd.DataFrame, keep_clean: bool = True) -> list[tuple[str, pd.DataFrame]]:
    """``matched`` split by what its runs leaked: the clean runs first, then one group per
    distinct leaked set in first-seen order. The clean group is there even when empty if
    ``keep_clean`` (a published row stays) or when nothing leaked (a row with no runs yet)."""
    leaked = pd.Series([leaked_text(run) for _, run in matched.iterrows()], index=matched.index,
                       dtype=object)
    clean = matched[leaked == ""]
    leaky = [(text, matched[leaked == text]) for text in dict.fromkeys(leaked) if text]
    return ([("", clean)] if keep_clean or not clean.empty or not leaky else []) + leaky


def _same_leak(runs: pd.DataFrame, leaked: str) -> pd.DataFrame:
    """The runs of ``runs`` that leaked exactly ``leaked`` ("" = the clean ones)."""
    if runs.empty:
        return runs
    return runs[[leaked_text(run) == leaked for _, run in runs.iterrows()]]


def _row_id(row: pd.Series) -> tuple:
    T = row["T"]
    return tuple(None if k == "T" and pd.isna(T) else (int(T) if k == "T" else row[k])
                 for k in ROW_KEYS)


def _row_info(matched: pd.DataFrame) -> dict:
    """The ROW_INFO of a row's runs (``leaked`` is the caller's)."""
    if matched.empty:
        return {"ours_backbone": "", "tiny": None, "n_runs": 0, "seeds": ""}
    names = sorted({str(b) for b in matched.get("backbone", pd.Series(dtype=object)).dropna()})
    seeds = matched["seed"].dropna().unique() if "seed" in matched.columns else []
    ordered = sorted(seeds, key=_seed_order)
    return {"ours_backbone": ",".join(names), "tiny": any(is_tiny(n) for n in names),
            "n_runs": len(matched), "seeds": ",".join(str(s) for s in ordered)}


def _seed_order(seed: object) -> tuple:
    try:
        return (0, float(seed), "")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return (1, 0.0, str(seed))


def _cell(paper: str, key: RowKey, metric: str, matched: pd.DataFrame,
          frame: pd.DataFrame, leaked: str = "") -> Cell:
    if _is_setting_column(paper, metric):  # ASAM Table 5 prints hyperparameters as columns
        return mean_std(per_seed(matched, metric, _setting_reader(paper)))
    relative = RELATIVE_METRICS.get(metric)
    if relative is None:
        return mean_std(per_seed(matched, metric))
    if not key.setting:  # the reference row itself: the paper prints "–"
        return Cell()
    # the reference runs leaked what these did: a difference never spans clean and leaky runs
    reference = _same_leak(dataclasses.replace(key, setting="").select(frame), leaked)
    return paired_difference(per_seed(matched, relative.of), per_seed(reference, relative.of))


def _is_setting_column(paper: str, metric: str) -> bool:
    known = (*ALL_METRIC_LABELS, *DERIVED_METRICS, *RELATIVE_METRICS, *COST_METRICS)
    return metric not in known and metric in PAPERS[paper].settings


def _setting_reader(paper: str):
    def read(run: pd.Series, name: str) -> float:
        value = config_value(run, setting_keys(paper, name))
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan
    return read


def _requires_text(paper: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in PAPERS[paper].requires.items())


def _p_value(key: RowKey, metric: str, matched: pd.DataFrame, frame: pd.DataFrame) -> float:
    if (norm_name(key.reg) or "none") == "none" or metric in RELATIVE_METRICS:
        return math.nan
    baseline = _same_leak(key.baseline().select(frame), "")  # reg=none: never leaky
    return paired_ttest(per_seed(matched, metric), per_seed(baseline, metric))


def _setting_names(paper: str, rows: pd.DataFrame) -> list[str]:
    names = list(PAPERS[paper].settings) if paper in PAPERS else []
    for text in rows["setting"]:
        names += [part.partition("=")[0].strip() for part in str(text).split(";") if "=" in part]
    return list(dict.fromkeys(names))


def _warn_pooled(paper: str, table: str, label: str, matched: pd.DataFrame,
                 names: list[str]) -> None:
    """Warn when one row's runs differ in a setting: their mean mixes configurations."""
    if len(matched) < 2:
        return
    for name in names:
        keys = setting_keys(paper, name)
        values = {str(config_value(run, keys)) for _, run in matched.iterrows()}
        values.discard("None")
        if len(values) > 1:
            warnings.warn(f"{paper}.{table} row {label!r}: pooling runs with different {name} "
                          f"({', '.join(sorted(values))}); name it in the row's setting or pass "
                          "only the runs you mean", stacklevel=3)
