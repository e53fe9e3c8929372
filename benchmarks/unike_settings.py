"""UniKE's per-family tiny settings, chosen on the TRAIN split (issue 14). Prints; asserts nothing.

    python benchmarks/unike_settings.py [--backbone tiny_blip2] [--data mini_vqa] [--held-out 200]
                                        [--edits 30] [--stream 20] [--only 0,2]

For each candidate (``SETTINGS``, on top of conf/editor/unike.yaml and ``BASE``), the encoders
are pre-trained in a temporary cache on the train split minus its last ``--held-out`` records
(settings with the same layers and training share one fit), then UniKE is scored by the real
evaluator on ``--edits`` single edits of the last train records (never fitted on) and on one
sequential stream of ``--stream`` of them (Rel, T-Gen, M-Gen, T-Loc, M-Loc); the neurons' memory
prompts are drawn from the whole train split, as T-Patcher's are. The first line is the
unedited model on the same records. Eval records are never edited or scored here.
conf/editor_backbone/unike_<backbone>.yaml takes, among the settings with single and stream
Rel >= 95 that use the latent memory, the best mean of the ten single and stream scores.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rows import (METRICS, held_out, held_out_parser, mean_row,  # noqa: E402
                            single_and_stream)

from mmke.editors.unike import UniKE  # noqa: E402

#: T-Patcher's tiny settings for the neurons (conf/editor_backbone/tpatcher_tiny_blip2.yaml) and
#: encoders sized for a hidden size of 128
BASE = dict(n_neurons=3, lr=0.03, steps=40, memory_prompts=50, encoder_width=128,
            encoder_dim=64, training=dict(steps=600, batch_size=16, lr=1e-4))
LAST4 = [-4, -3, -2, -1]
SETTINGS = [
    dict(layers=[-1]),
    dict(layers=[-2, -1]),
    dict(layers=LAST4),
    dict(layers=[-2, -1], relevance_threshold=0.5),
    dict(layers=[-2, -1], relevance_threshold=0.8),
    dict(layers=LAST4, relevance_threshold=0.8),
    dict(layers=[-2, -1], latent=False),
    dict(layers=[-2, -1], relevance_threshold=0.8,
         training=dict(steps=1500, batch_size=16, lr=1e-4)),
    dict(layers=[-2, -1], relevance_threshold=0.8, truth_beta=0.0),
]


def mean_of(rows: list[dict]) -> float:
    return sum(sum(r[m] for m in METRICS) for r in rows) / (len(rows) * len(METRICS))


def main() -> None:
    parser = held_out_parser(__doc__)
    parser.set_defaults(edits=30)
    parser.add_argument("--only", default="", help="comma-separated indices into SETTINGS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = held_out(args, 64)
    backbone, source, evaluator = setup.backbone, setup.source, setup.evaluator
    train, fit_on, scored = setup.train, setup.fit_on, setup.scored
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(SETTINGS))
    with tempfile.TemporaryDirectory() as cache:
        for index in chosen:
            setting = {**BASE, **SETTINGS[index]}
            setting["training"] = {"checkpoint_every": 100_000, **setting["training"]}
            editor = UniKE(**setting, cache_dir=cache, progress=False)
            editor.attach(backbone, source.templates, train_records=lambda: train)
            start = time.perf_counter()
            report = editor.fit(fit_on)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            single, stream = single_and_stream(editor, evaluator, scored, args.stream)
            per_edit = (time.perf_counter() - start) / (len(scored) + args.stream)
            label = f"[{index}] {SETTINGS[index]}"
            print(f"{label:64} single: {mean_row(single)}  (fit {fit_s:.0f} s, "
                  f"losses {report.last_losses})")
            print(f"{'':64} stream: {mean_row(stream)}  mean10 "
                  f"{(mean_of(single) + mean_of(stream)) / 2:5.1f}  ({per_edit:.1f} s/edit)",
                  flush=True)


if __name__ == "__main__":
    main()
