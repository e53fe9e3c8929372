"""T-Patcher's per-family settings, chosen on the TRAIN split (issue 12). Prints; asserts nothing.

    python benchmarks/tpatcher_settings.py [--backbone tiny_blip2] [--data mini_vqa] [--edits 30]
                                           [--stream 20]

For each candidate setting (``SETTINGS``, on top of conf/editor/tpatcher.yaml): ``--edits``
single edits of train records, then one sequential stream of ``--stream`` train records, each
scored by the real evaluator on the train records' own prompts (Rel, T-Gen, M-Gen, T-Loc,
M-Loc). Each line also gives the share of memory queries on which a new neuron still fires after
its edit, and the time per edit. Eval records are never edited or scored here.
conf/editor_backbone/tpatcher_<backbone>.yaml takes, among the settings with single and stream
Rel >= 95, the one with the best T-Loc/M-Loc (no setting tried kept stream M-Loc at 99).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import (  # noqa: E402
    load_train, mean_row, single_and_stream, train_edits_parser,
)
from mmke.editors.tpatcher import TPatcher  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from mmke.protocols.sequential import Sequential  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402

SETTINGS = [dict(), dict(n_neurons=3), dict(n_neurons=3, steps=50), dict(n_neurons=3, lr=0.03),
            dict(n_neurons=3, lr=0.03, memory_prompts=50),
            dict(n_neurons=3, lr=0.03, memory_weight=20.0),
            dict(n_neurons=3, lr=0.03, memory_margin=-6.0),
            dict(n_neurons=3, lr=0.03, steps=40, memory_prompts=50),
            dict(n_neurons=3, lr=0.05, memory_prompts=50)]


def main() -> None:
    parser = train_edits_parser(__doc__)
    parser.add_argument("--stream", type=int, default=20)
    args = parser.parse_args()
    backbone, source, train = load_train(args)
    # edited records from the end of the split; memory prompts are drawn from all of it
    edited = train[-args.edits:]
    evaluator = Evaluator(MetricSpec(), source.templates)
    for setting in SETTINGS:
        editor = TPatcher(**setting)
        editor.attach(backbone, source.templates, train_records=lambda: train)
        fire: list[float] = []
        edit = editor.edit

        def recorded(records, edit=edit, fire=fire):
            outcome = edit(records)
            fire.append(outcome.extra.get("memory_fire_rate", 0.0))
            return outcome

        editor.edit = recorded  # type: ignore[method-assign]
        start = time.perf_counter()
        single = SingleEdit().run(editor, evaluator, edited, sink=lambda row: None,
                                  progress=False)
        per_edit = (time.perf_counter() - start) / len(edited)
        stream = Sequential(T=args.stream).run(editor, evaluator, edited[:args.stream],
                                               sink=lambda row: None, progress=False)
        print(f"{str(setting) or 'default':32} single: {mean_row(single)}  "
              f"memory fires {100 * sum(fire) / len(fire):4.1f}%  ({per_edit * 1000:.0f} ms/edit)")
        print(f"{'':32} stream: {mean_row(stream)}")


if __name__ == "__main__":
    main()
