"""What the benchmark scripts print about per-edit rows: the five metrics, averaged."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmke.backbones.base import Backbone
from mmke.data.record import EditRecord
from mmke.editors.base import Editor
from mmke.evaluation.evaluator import Evaluator
from mmke.protocols.sequential import Sequential
from mmke.protocols.single import SingleEdit

METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


def mean_row(rows: Sequence[dict], keys: Sequence[str] = METRICS, suffix: str = "") -> str:
    """``rel 95.0  t_gen 93.3 ...``: each metric's mean over ``rows`` (``suffix``: read
    ``<metric><suffix>``, e.g. ``_final`` for the end-of-stream scores)."""
    parts = []
    for m in keys:
        values = [r[m + suffix] for r in rows if r.get(m + suffix) is not None]  # None: not scored
        parts.append(f"{m} {sum(values) / max(1, len(values)):5.1f}")
    return "  ".join(parts)


def single_and_stream(editor: Editor, evaluator: Evaluator, records: Sequence[EditRecord],
                      stream: int) -> tuple[list[dict], list[dict]]:
    """The rows of single edits of ``records``, then of one sequential stream of their first
    ``stream`` (the editor restored in between, as each protocol leaves it)."""
    single = SingleEdit().run(editor, evaluator, records, sink=lambda row: None, progress=False)
    streamed = Sequential(T=stream).run(editor, evaluator, records[:stream],
                                        sink=lambda row: None, progress=False)
    return single, streamed


def held_out_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the scripts that fit on the train split without its last ``--held-out``
    records and score ``--edits`` of those, single and as a stream of ``--stream``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--backbone", default="tiny_blip2")
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--stream", type=int, default=20)
    return parser


def train_edits_parser(doc: str, backbone: str = "tiny_blip2") -> argparse.ArgumentParser:
    """The arguments of the scripts that edit the last ``--edits`` train records of ``--data``
    on ``--backbone`` (edit-time editors: nothing is fitted)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--backbone", default=backbone)
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--edits", type=int, default=30)
    return parser


def load_train(args: argparse.Namespace) -> tuple[Backbone, Any, list[EditRecord]]:
    """One torch thread (settings scripts are compared at one thread), then ``--backbone``,
    ``--data`` and its train split."""
    import torch

    from benchmarks.spine import load

    torch.set_num_threads(1)
    backbone, source = load([f"backbone={args.backbone}", f"data={args.data}"])
    return backbone, source, source.records("train")


@dataclass
class HeldOut:
    """What a held-out settings script works on: the backbone, the data source, the train
    split (``train``) cut into ``fit_on`` (all but the last ``--held-out`` records, what the
    editor fits on) and ``scored`` (the last ``--edits``), and the evaluator."""

    backbone: Backbone
    source: Any
    train: list[EditRecord]
    fit_on: list[EditRecord]
    scored: list[EditRecord]
    evaluator: Evaluator


def held_out(args: argparse.Namespace, label_width: int = 64) -> HeldOut:
    """Load ``--backbone``/``--data``, cut the train split, and print the unedited model's row
    on the scored records (the baseline every setting is read against)."""
    from benchmarks.spine import load
    from mmke.editors.base import NoEdit
    from mmke.evaluation.spec import MetricSpec

    backbone, source = load([f"backbone={args.backbone}", f"data={args.data}"])
    train = source.records("train")
    setup = HeldOut(backbone, source, train, train[:-args.held_out], train[-args.edits:],
                    Evaluator(MetricSpec(), source.templates))
    unedited = NoEdit()
    unedited.attach(backbone, source.templates)
    base = SingleEdit().run(unedited, setup.evaluator, setup.scored, sink=lambda row: None,
                            progress=False)
    print(f"{'unedited':{label_width}} single: {mean_row(base)}")
    return setup
