"""Show a built table: a display frame of formatted text, as Markdown, LaTeX or CSV.

The display frame has one column for the row label ("Method"), one for each row key that
varies between rows (Model, Task, Protocol, T, Setting), then per metric the paper's value,
ours ("mean ± std") and, where tested, the p-value (starred below the paper's alpha), and
last the backbone our numbers came from. Missing numbers are "–". Row keys that are the same
for every row go to :func:`caption`, and so does a footnote when rows come from leaky runs
(labelled "(leaky: …)"). CSV export writes the full numeric table instead.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

from mmke.evaluation.names import BACKBONE_LABELS, TASK_LABELS, column_label

MISSING = "–"
FORMATS: tuple[str, ...] = ("md", "tex", "csv")
_KEY_LABELS = {"backbone": "Model", "task": "Task", "protocol": "Protocol", "T": "T",
               "setting": "Setting"}
#: the caption's footnote on rows built from leaky runs (``mmke.tables.build``)
LEAKY_NOTE = ("(leaky: …) rows: ours from runs whose edits saw the evaluated record's own "
              "prompts named there (t_gen/m_gen: its text/image rephrase, t_loc/m_loc: its "
              "locality prompts), an opt-in reading of the paper; not comparable with the "
              "other rows")


def display_frame(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """The table as formatted text, one display column per shown field."""
    metrics: list[str] = list(table.attrs.get("metrics", []))
    alpha = table.attrs.get("alpha")
    tested = _tested(table)
    shown: dict[str, list[str]] = {"Method": [str(v) for v in table["row_label"]]}
    for key, label in _KEY_LABELS.items():
        if _varies(table[key]):
            shown[label] = [_key_text(key, v) for v in table[key]]
    for m in metrics:
        label = column_label(m)
        shown[label] = [_pm(v, s, digits) for v, s in zip(table[f"{m}.paper"],
                                                          table[f"{m}.paper_std"])]
        shown[f"{label} ours"] = [_pm(v, s, digits) for v, s in zip(table[f"{m}.ours"],
                                                                    table[f"{m}.ours_std"])]
        if f"{m}.p" in table.columns and tested:
            shown[f"{label} p"] = [_p(v, alpha) for v in table[f"{m}.p"]]
    shown["Ours from"] = [_source(b, n) for b, n in zip(table["ours_backbone"], table["seeds"])]
    return pd.DataFrame(shown)


def caption(table: pd.DataFrame) -> str:
    """One line naming the table, the row keys shared by all rows, and where ours came from."""
    parts = [f"{table.attrs.get('paper', '?')}.{table.attrs.get('table', '?')}"]
    for key, label in _KEY_LABELS.items():
        values = {_key_text(key, v) for v in table[key]} - {MISSING}
        if len(values) == 1 and not _varies(table[key]):
            parts.append(f"{label.lower()}={values.pop()}")
    if table.attrs.get("tiny"):
        parts.append("ours from tiny models (the embedded default), not the paper's backbones")
    if table.attrs.get("alpha") and _tested(table):
        parts.append(f"p: paired t-test over seeds vs. reg=none, * p < {table.attrs['alpha']}")
    if table.attrs.get("leaky"):
        parts.append(LEAKY_NOTE)
    return "; ".join(parts)


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub-flavoured Markdown pipe table, preceded by its caption in italics."""
    shown = display_frame(table, digits)
    header = list(shown.columns)
    body = [[_md_cell(v) for v in row] for row in shown.itertuples(index=False)]
    align = ["---" if c in ("Method", *_KEY_LABELS.values(), "Ours from") else "---:"
             for c in header]
    lines = [f"_{_md_cell(caption(table))}_", "",
             "| " + " | ".join(_md_cell(h) for h in header) + " |",
             "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, digits: int = 2) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), caption as a comment."""
    shown = display_frame(table, digits)
    spec = "".join("l" if c in ("Method", *_KEY_LABELS.values(), "Ours from") else "r"
                   for c in shown.columns)
    lines = [f"% {caption(table)}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(_tex(c) for c in shown.columns) + " \\\\", "\\midrule"]
    lines += [" & ".join([_tex_label(row[0]), *(_tex(v) for v in row[1:])]) + " \\\\"
              for row in shown.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """The full numeric table (every column of ``build_table``'s frame) as CSV."""
    return table.to_csv(index=False)


def render(table: pd.DataFrame, fmt: str, digits: int = 2) -> str:
    """The table in format ``fmt`` (``md``, ``tex`` or ``csv``)."""
    if fmt == "md":
        return to_markdown(table, digits)
    if fmt == "tex":
        return to_latex(table, digits)
    if fmt == "csv":
        return to_csv(table)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_table(table: pd.DataFrame, out: str | os.PathLike[str],
                formats: tuple[str, ...] = FORMATS, digits: int = 2) -> list[Path]:
    """Write ``<paper>.<table>.<fmt>`` for each format into folder ``out``; the paths written."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{table.attrs.get('paper', 'table')}.{table.attrs.get('table', 'table')}"
    paths = []
    for fmt in formats:
        path = folder / f"{stem}.{fmt}"
        path.write_text(render(table, fmt, digits), encoding="utf-8")
        paths.append(path)
    return paths


def _tested(table: pd.DataFrame) -> bool:
    """Whether p-values apply to any row: only rows with a regularizer are tested."""
    return any(_text(r).lower() not in ("none", MISSING) for r in table["reg"])


def _varies(column: pd.Series) -> bool:
    return len({_text(v) for v in column}) > 1


def _key_text(key: str, value: object) -> str:
    text = _text(value)
    labels = {"task": TASK_LABELS, "backbone": BACKBONE_LABELS}.get(key, {})
    return labels.get(text, text)


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return MISSING
    text = str(value).strip()
    return text if text else MISSING


def _number(value: object, digits: int) -> str:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return MISSING
    if math.isnan(v):
        return MISSING
    if v != 0 and abs(v) < 10 ** -digits:  # 1e-3 as a hyperparameter, not "0.00"
        return f"{v:.{max(digits, 1)}g}"
    return f"{v:.{digits}f}"


def _pm(value: object, std: object, digits: int) -> str:
    mean = _number(value, digits)
    spread = _number(std, digits)
    return mean if mean == MISSING or spread == MISSING else f"{mean} ± {spread}"


def _p(value: object, alpha: float | None) -> str:
    try:
        p = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return MISSING
    if math.isnan(p):
        return MISSING
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return text + ("*" if alpha and p < alpha else "")


def _source(backbone: object, seeds: object) -> str:
    name = _text(backbone)
    if name == MISSING:
        return MISSING
    n = len([s for s in str(seeds).split(",") if s])
    return f"{name} ×{n} seed{'s' if n != 1 else ''}" if n else name


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--", "Δ": r"$\Delta$",
                "×": r"$\times$", "<": r"$<$"}


def _tex_label(value: object) -> str:
    """A row label as printed in the paper may hold LaTeX (``M-ORE $_1$``, ``10^{-1}``,
    ``w/o \\mathcal{R}_{rel}``): math stays as it is, a word with a command, sub- or
    superscript is put in math mode, other words are escaped."""
    text = str(value)
    if "$" in text:
        return text
    words = []
    for word in text.split(" "):
        math_like = "\\" in word or re.search(r"[\^_]\{", word)
        words.append(f"${word}$" if math_like else _tex(word))
    return " ".join(words)


def _tex(value: object) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(value))
