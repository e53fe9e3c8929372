"""SERAC's tiny per-family settings, chosen on the TRAIN split (issue 13). Prints; asserts nothing.

    python benchmarks/serac_settings.py [--backbone tiny_blip2] [--data mini_vqa] [--held-out 200]
                                        [--edits 50] [--stream 20] [--threads 2] [--only 0 2]

Each candidate (``SETTINGS``, overrides of what ``editor=serac backbone=<backbone>`` composes) is
fitted on the train split without its last ``--held-out`` records, into a fresh temporary cache;
then ``--edits`` single edits of held-out train records and one sequential stream of ``--stream``
of them are scored by the real evaluator on those records' own prompts. Eval records are never
fitted, edited or scored here. conf/editor_backbone/serac_<backbone>.yaml takes the candidate
with the best single-edit Rel among those whose fit stays under 10 minutes on 2 cores.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import held_out_parser, mean_row, single_and_stream  # noqa: E402
from benchmarks.serac_fit import composed_editor  # noqa: E402
from benchmarks.spine import load  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402

SETTINGS: list[tuple[str, ...]] = [
    ("editor.training.steps=150",),
    ("editor.training.steps=300",),
    ("editor.training.steps=300", "editor.training.lr=3e-3"),
    ("editor.training.steps=500",),
    # the backbone's own language model as the starting point (the other choice of the comment
    # in conf/editor_backbone/serac_tiny_blip2.yaml)
    ("editor.training.steps=300", "editor.counterfactual_init=pretrained"),
]


def main() -> None:
    parser = held_out_parser(__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", type=int, nargs="*", default=None,
                        help="indices into SETTINGS to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone, source = load([f"backbone={args.backbone}", f"data={args.data}"])
    train = source.records("train")
    fitted, held_out = train[:-args.held_out], train[-args.held_out:][:args.edits]
    evaluator = Evaluator(MetricSpec(), source.templates)
    chosen = SETTINGS if args.only is None else [SETTINGS[i] for i in args.only]
    for setting in chosen:
        editor, _ = composed_editor(args.backbone, args.data, tempfile.mkdtemp(prefix="serac_"),
                                    setting, progress=False)
        editor.attach(backbone, source.templates, train_records=lambda: fitted)
        start = time.perf_counter()
        editor.fit(fitted)
        fit_s = time.perf_counter() - start
        single, stream = single_and_stream(editor, evaluator, held_out, args.stream)
        print(f"{setting}  fit {fit_s:.0f} s")
        print(f"    single: {mean_row(single)}")
        print(f"    stream: {mean_row(stream)}")


if __name__ == "__main__":
    main()
