"""The papers' published numbers (``experiments/published/<paper>.csv``) against the papers.

Three layers of checks: the tidy schema (columns, vocabulary, numbers, unique keys); the shape
of every table (cell counts, so a dropped row fails); and the cells themselves, each found in
the line of its table in ``../shared/papers/<paper>.md`` that carries its row label, each
printed row's cells side by side in metric order, plus a few cells asserted by hand.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import CONF, ROOT

PUBLISHED = ROOT / "experiments" / "published"
PAPERS_DIR = ROOT.parent / "shared" / "papers"
PAPERS = ("odedit", "asam", "more")

COLUMNS = ["table", "backbone", "task", "editor", "reg", "protocol", "T", "setting", "row_label",
           "metric", "value", "std", "note"]
KEY = ("table", "backbone", "task", "editor", "reg", "protocol", "T", "setting", "row_label",
       "metric")

BACKBONES = {"", "blip2", "minigpt4", "llava", "qwen2vl"}
TASKS = {"", "vqa", "caption"}
EDITORS = {"", "none", "ft", "ft_l", "ft_m", "ike", "serac", "mend", "tpatcher", "wise", "unike",
           "alphaedit", "liveedit", "more"}
REGS = {"none", "odedit", "asam"}
PROTOCOLS = {"", "single", "sequential", "online"}
METRICS = {
    "rel", "gen", "t_gen", "m_gen", "t_loc", "m_loc", "avg", "avg_delta",
    # cost columns
    "memory_gb", "memory_mb", "runtime_s", "edit_time_per_step_s", "train_time_per_step_s",
    "time_per_step_s", "steps",
    # ASAM Table 5: hyperparameter values
    "eps", "n", "tau", "beta",
}
SETTING = re.compile(r"^[a-z][a-z0-9_]*=[^;=\s]+(;[a-z][a-z0-9_]*=[^;=\s]+)*$")

#: Cells per table: printed rows x metric columns (see experiments/README.md).
EXPECTED_CELLS = {
    "odedit": {
        "table1": 2 * 12 * 8,      # 2 backbones x 12 methods x (4 metrics x 2 tasks)
        "table2": 2 * 4 * 2 * 4,   # 2 tasks x 4 methods x 2 horizons x 4 metrics
        "table3": 4 * 8,           # 4 variants x (4 metrics x 2 tasks)
        "table4": 4 * 4,           # 4 variants x 4 metrics
        "table5": 2 * 2 * 4,       # 2 tasks x 2 methods x 4 metrics
        "table6": 4 * 2 * 5,       # 4 methods x 2 backbones x 5 cost columns
    },
    "asam": {
        "table1": 2 * 10 * 8,      # 2 backbones x 10 methods x (4 metrics x 2 tasks)
        "table2": 3 * 2 * 8,       # 3 horizons x 2 methods x (4 metrics x 2 tasks)
        "table3": 4 * 8,           # 4 rows x (4 metrics x 2 tasks)
        "table4": 6 * 8,           # 6 variants x (4 metrics x 2 tasks)
        "table5": 4,               # 4 hyperparameters
        "table6": 5 * 4,           # 5 values of epsilon x 4 metrics
        "table7": 2 * 4 * 4,       # 2 panels x 4 values x 4 metrics
        "table8": 4 * 2,           # 4 rows x (memory, runtime)
    },
    "more": {
        "table1": 2 * 16 * 12,             # 2 backbones x 8 methods x 2 horizons x (6 x 2 tasks)
        "table3": 9 * 6 + 6,               # 9 rows x 6 metrics, plus Δ for the 6 ablated rows
        "table4": (24 + 23) * 12,          # BLIP2-OPT 8 methods x 3 horizons; LLaVA lacks AlphaEdit_10
    },
}

#: Hand-picked cells, read off the papers by eye: (paper, key fields, printed value).
HAND_PICKED = [
    ("odedit", dict(table="table1", backbone="blip2", task="vqa", editor="wise", reg="odedit",
                    metric="rel"), "100"),
    ("odedit", dict(table="table1", backbone="blip2", task="vqa", editor="wise", reg="odedit",
                    metric="m_loc"), "13.83"),
    ("odedit", dict(table="table1", backbone="minigpt4", task="caption", editor="unike",
                    reg="odedit", metric="m_loc"), "85.12"),
    ("odedit", dict(table="table1", backbone="blip2", task="caption", editor="none", reg="none",
                    metric="gen"), "0"),
    ("odedit", dict(table="table2", task="vqa", editor="wise", reg="none", T="5",
                    metric="t_loc"), "0.40"),
    ("odedit", dict(table="table2", task="caption", editor="unike", reg="odedit", T="10",
                    metric="m_loc"), "76.59"),
    ("odedit", dict(table="table3", task="caption", setting="variant=no_loc", metric="t_loc"),
     "64.49"),
    ("odedit", dict(table="table4", row_label="Contrast", metric="m_loc"), "89.91"),
    ("odedit", dict(table="table5", task="caption", reg="odedit", metric="m_loc"), "95.92"),
    ("odedit", dict(table="table6", backbone="minigpt4", editor="mend", reg="odedit",
                    metric="steps"), "15000"),
    ("odedit", dict(table="table6", backbone="blip2", editor="wise", reg="odedit",
                    metric="memory_gb"), "47.53"),
    ("asam", dict(table="table1", backbone="blip2", task="vqa", editor="wise", reg="asam",
                  metric="gen"), "93.97"),
    ("asam", dict(table="table1", backbone="blip2", task="caption", editor="wise", reg="none",
                  metric="gen"), "82.54"),
    ("asam", dict(table="table1", backbone="minigpt4", task="caption", editor="mend", reg="asam",
                  metric="m_loc"), "87.64"),
    ("asam", dict(table="table2", task="vqa", reg="asam", T="100", metric="gen"), "50.90"),
    ("asam", dict(table="table2", task="vqa", reg="none", T="100", metric="gen"), "34.90"),
    ("asam", dict(table="table3", backbone="qwen2vl", task="vqa", reg="asam", metric="t_loc"),
     "30.35"),
    ("asam", dict(table="table4", task="vqa", setting="align=l2", metric="t_loc"), "97.7"),
    ("asam", dict(table="table5", metric="beta"), "10"),
    ("asam", dict(table="table6", setting="eps=1e-3", metric="gen"), "86.23"),
    ("asam", dict(table="table7", setting="beta=15;tau=4", metric="gen"), "87.04"),
    ("asam", dict(table="table8", backbone="minigpt4", reg="asam", metric="runtime_s"),
     "790.78"),
    ("asam", dict(table="table8", backbone="blip2", reg="none", metric="memory_mb"), "10688"),
    ("more", dict(table="table1", backbone="blip2", task="caption", editor="more", T="100",
                  metric="rel"), "78.17"),
    ("more", dict(table="table1", backbone="blip2", task="caption", editor="more", T="100",
                  metric="avg"), "82.49"),
    ("more", dict(table="table4", backbone="blip2", task="caption", editor="more", T="100",
                  metric="avg"), "82.50"),
    ("more", dict(table="table1", backbone="llava", task="vqa", editor="mend", T="100",
                  metric="t_loc"), "75.33"),
    ("more", dict(table="table4", backbone="llava", task="caption", editor="mend", T="10",
                  metric="avg"), "3.75"),
    ("more", dict(table="table4", backbone="blip2", task="vqa", editor="ike", T="10",
                  metric="m_loc"), "8.67"),
    ("more", dict(table="table3", T="100", setting="variant=no_freeze", metric="avg_delta"),
     "-18.10"),
    ("more", dict(table="table3", T="10", setting="", metric="t_gen"), "98.20"),
]


def load(paper: str) -> list[dict[str, str]]:
    with open(PUBLISHED / f"{paper}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=PAPERS)
def paper(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def papers_dir() -> Path:
    if not PAPERS_DIR.is_dir():
        pytest.skip(f"the papers are not beside the repository ({PAPERS_DIR} is missing)")
    return PAPERS_DIR


def table_lines(text: str) -> dict[str, list[str]]:
    """Each table's body: the first run of tab-separated lines after its caption
    ("Table 3." in ODEdit and M-ORE, "Table 3:" in ASAM)."""
    lines = text.splitlines()
    bodies: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        caption = re.match(r"Table (\d+)[.:]", line)
        if not caption:
            continue
        start = i + 1
        while start < len(lines) and "\t" not in lines[start]:
            start += 1
        end = start
        while end < len(lines) and "\t" in lines[end]:
            end += 1
        bodies[f"table{caption.group(1)}"] = lines[start:end]
    return bodies


def printed_forms(value: str) -> set[str]:
    """The ways a CSV number can be printed in the papers: as is, with a typographic minus or an
    explicit plus, with thousands separators, with a GB unit, or as a power of ten."""
    forms = {value}
    if value.startswith("-"):
        forms |= {"–" + value[1:], "−" + value[1:]}
    else:
        forms.add("+" + value)
    whole, _, frac = value.lstrip("-").partition(".")
    if whole.isdigit() and len(whole) > 3:
        forms.add(f"{int(whole):,}" + (f".{frac}" if frac else ""))
    number = float(value)
    if 0 < number < 1 and math.isclose(math.log10(number), round(math.log10(number))):
        forms.add(f"10^{{{round(math.log10(number))}}}")
    return forms | {f + "GB" for f in forms}


# ----------------------------------------------------------------------------- schema


def test_columns_are_the_tidy_schema(paper):
    with open(PUBLISHED / f"{paper}.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == COLUMNS


def test_vocabulary(paper):
    for i, row in enumerate(load(paper), start=2):
        where = f"{paper}.csv line {i}"
        assert re.fullmatch(r"table[1-8]", row["table"]), where
        assert row["backbone"] in BACKBONES, where
        assert row["task"] in TASKS, where
        assert row["editor"] in EDITORS, where
        assert row["reg"] in REGS, where
        assert row["protocol"] in PROTOCOLS, where
        assert row["metric"] in METRICS, where
        assert row["row_label"], where
        assert row["setting"] == "" or SETTING.match(row["setting"]), where
        if row["protocol"] in ("sequential", "online"):
            assert row["T"].isdigit() and int(row["T"]) >= 1, where
        else:
            assert row["T"] == "", where


def test_values_are_numbers(paper):
    for i, row in enumerate(load(paper), start=2):
        assert math.isfinite(float(row["value"])), f"{paper}.csv line {i}"
        assert row["std"] == "" or math.isfinite(float(row["std"])), f"{paper}.csv line {i}"


def test_no_duplicate_keys(paper):
    counts = Counter(tuple(row[k] for k in KEY) for row in load(paper))
    assert [k for k, n in counts.items() if n > 1] == []


def test_every_editor_and_regularizer_has_a_config(paper):
    """Each method name is a config option, so a table's rows can be run (or say they cannot)."""
    for row in load(paper):
        if row["editor"]:
            assert (CONF / "editor" / f"{row['editor']}.yaml").is_file(), row["editor"]
        assert (CONF / "reg" / f"{row['reg']}.yaml").is_file(), row["reg"]


# ----------------------------------------------------------------------------- shape


def test_cell_counts_per_table(paper):
    assert dict(Counter(row["table"] for row in load(paper))) == EXPECTED_CELLS[paper]


def test_rows_per_table_have_the_same_metrics():
    """Within a table, every printed row has the same metric columns (no half-copied rows)."""
    for paper in PAPERS:
        by_row: dict[tuple, set[str]] = {}
        for row in load(paper):
            key = tuple(row[k] for k in KEY[:-1])
            by_row.setdefault(key, set()).add(row["metric"])
        tables: dict[str, set[frozenset[str]]] = {}
        for key, metrics in by_row.items():
            metrics.discard("avg_delta")  # M-ORE Table 3 prints Δ only for the ablated rows
            tables.setdefault(key[0], set()).add(frozenset(metrics))
        for table, shapes in tables.items():
            if table == "table5" and paper == "asam":
                continue  # one hyperparameter per row
            assert len(shapes) == 1, f"{paper} {table}: {shapes}"


def test_more_table4_horizons():
    """BLIP2-OPT has every method at 1, 10 and 100 edits; the paper's LLaVA block has no
    AlphaEdit_10 row, and none is invented."""
    rows = [r for r in load("more") if r["table"] == "table4" and r["metric"] == "rel"
            and r["task"] == "vqa"]
    blip2 = Counter(r["T"] for r in rows if r["backbone"] == "blip2")
    llava = Counter(r["T"] for r in rows if r["backbone"] == "llava")
    assert blip2 == {"1": 8, "10": 8, "100": 8}
    assert llava == {"1": 8, "10": 7, "100": 8}
    assert not [r for r in rows if r["backbone"] == "llava" and r["editor"] == "alphaedit"
                and r["T"] == "10"]


def test_more_table2_is_symbolic(papers_dir):
    """M-ORE Table 2 holds big-O expressions only, so it has no rows (see experiments/README.md)."""
    body = table_lines((papers_dir / "more.md").read_text(encoding="utf-8"))["table2"]
    assert any("O(" in line for line in body)
    assert not [r for r in load("more") if r["table"] == "table2"]


# ----------------------------------------------------------------------------- cells


def test_every_cell_is_printed_in_its_row_of_the_paper(paper, papers_dir):
    bodies = table_lines((papers_dir / f"{paper}.md").read_text(encoding="utf-8"))
    missing = []
    for i, row in enumerate(load(paper), start=2):
        body = bodies.get(row["table"])
        assert body, f"{paper}: no '{row['table']}' caption found in {paper}.md"
        forms = printed_forms(row["value"])
        lines = [[t.strip() for t in line.split("\t")] for line in body]
        if not any(row["row_label"] in tokens and forms & set(tokens) for tokens in lines):
            missing.append(f"line {i}: {row['row_label']!r} {row['metric']}={row['value']}")
    assert missing == [], f"{paper}: cells not found in the paper's table rows: {missing[:10]}"


def test_each_row_is_printed_in_column_order(paper, papers_dir):
    """The cells of one printed row (one task block, one horizon) appear side by side, in the
    order the CSV gives their metrics, on a line of the paper carrying the row's label."""
    bodies = table_lines((papers_dir / f"{paper}.md").read_text(encoding="utf-8"))
    groups: dict[tuple, list[str]] = {}
    for row in load(paper):
        groups.setdefault(tuple(row[k] for k in KEY[:-1]), []).append(row["value"])
    for key, values in groups.items():
        label, lines = key[-1], [[t.strip() for t in line.split("\t")] for line in bodies[key[0]]]
        wanted = [printed_forms(v) for v in values]

        def run_at(tokens: list[str], start: int) -> bool:
            return all(tokens[start + j] in forms for j, forms in enumerate(wanted))

        assert any(label in tokens and any(run_at(tokens, s)
                                           for s in range(len(tokens) - len(wanted) + 1))
                   for tokens in lines), f"{paper}: {key} {values} not printed in this order"


def test_row_labels_are_printed_in_their_table(paper, papers_dir):
    bodies = table_lines((papers_dir / f"{paper}.md").read_text(encoding="utf-8"))
    for row in load(paper):
        tokens = {t.strip() for line in bodies[row["table"]] for t in line.split("\t")}
        assert row["row_label"] in tokens, (row["table"], row["row_label"])


@pytest.mark.parametrize("paper_name, fields, value", HAND_PICKED,
                         ids=[f"{p}-{f['table']}-{v}" for p, f, v in HAND_PICKED])
def test_hand_picked_cells(paper_name, fields, value):
    rows = [r for r in load(paper_name) if all(r[k] == v for k, v in fields.items())]
    assert [r["value"] for r in rows] == [value], rows


def test_tables_disagreeing_with_each_other_are_noted():
    """M-ORE prints a few cells differently in Table 1 and Table 4: both kept, each noted."""
    rows = load("more")
    t1 = {(r["backbone"], r["task"], r["editor"], r["T"], r["metric"]): r
          for r in rows if r["table"] == "table1"}
    t4 = {(r["backbone"], r["task"], r["editor"], r["T"], r["metric"]): r
          for r in rows if r["table"] == "table4"}
    assert set(t1) <= set(t4)
    differ = [k for k in t1 if t1[k]["value"] != t4[k]["value"]]
    assert len(differ) == 4
    for k in differ:
        assert t4[k]["value"] in t1[k]["note"] and t1[k]["value"] in t4[k]["note"]
