"""MEND's per-family tiny settings, chosen on the TRAIN split (issue 13). Prints; asserts nothing.

    python benchmarks/mend_settings.py [--backbone tiny_blip2] [--data mini_vqa] [--held-out 200]
                                       [--edits 50] [--stream 20] [--only 0,2]

For each candidate (``SETTINGS``, on top of conf/editor/mend.yaml; about 3-7 minutes each on
one thread), MEND is fitted in a temporary cache on the train split minus its last
``--held-out`` records, then scored by the real evaluator on ``--edits`` single edits of the
last train records (never fitted on) and on one sequential stream of ``--stream`` of them (Rel,
T-Gen, M-Gen, T-Loc, M-Loc). The first line is the unedited model on the same records. Eval
records are never edited or scored here. conf/editor_backbone/mend_<backbone>.yaml takes, among
the settings with single-edit Rel >= 95, the shortest fit (the meta-loss weights and the edit
rates stay EasyEdit's).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rows import held_out, held_out_parser, mean_row, single_and_stream  # noqa: E402

from mmke.editors.mend import MEND  # noqa: E402

SETTINGS = [
    dict(rank=64, training=dict(steps=1000, batch_size=8, lr=1e-4)),
    dict(rank=64, training=dict(steps=1500, batch_size=8, lr=1e-4)),
    dict(rank=64, training=dict(steps=600, batch_size=8, lr=3e-4)),
    dict(rank=128, training=dict(steps=600, batch_size=8, lr=1e-4)),
    dict(rank=64, lr_lr=1e-3, training=dict(steps=600, batch_size=8, lr=1e-4)),
    dict(rank=64, locality_weight=3.0, training=dict(steps=1000, batch_size=8, lr=1e-4)),
]


def main() -> None:
    parser = held_out_parser(__doc__)
    parser.add_argument("--only", default="", help="comma-separated indices into SETTINGS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = held_out(args, 70)
    backbone, source, evaluator = setup.backbone, setup.source, setup.evaluator
    fit_on, scored = setup.fit_on, setup.scored
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(SETTINGS))
    for index in chosen:
        setting = SETTINGS[index]
        training = {"checkpoint_every": 100_000, **setting.get("training", {})}
        with tempfile.TemporaryDirectory() as cache:
            editor = MEND(**{**setting, "training": training}, cache_dir=cache, progress=False)
            editor.attach(backbone, source.templates, train_records=lambda: fit_on)
            start = time.perf_counter()
            editor.fit(fit_on)
            fit_s = time.perf_counter() - start
        single, stream = single_and_stream(editor, evaluator, scored, args.stream)
        label = f"[{index}] {setting}"
        print(f"{label:70} single: {mean_row(single)}  (fit {fit_s:.0f} s)")
        print(f"{'':70} stream: {mean_row(stream)}", flush=True)


if __name__ == "__main__":
    main()
