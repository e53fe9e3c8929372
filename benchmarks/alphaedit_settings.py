"""AlphaEdit's per-family settings, chosen on the TRAIN split (issue 12). Prints; asserts nothing.

    python benchmarks/alphaedit_settings.py [--backbone tiny_blip2] [--data mini_vqa] [--edits 30]
                                            [--stream 20] [--k0 1000]

For each candidate setting (``SETTINGS``, on top of the composed ``editor=alphaedit
backbone=<family>`` config): ``--edits`` single edits of train records, then one sequential
stream of ``--stream`` of them, each scored by the real evaluator on the train records' own
prompts (Rel, T-Gen, M-Gen, T-Loc, M-Loc), with the time per edit and the null-space dimension
per layer. K0 is built from ``--k0`` other train records (the edited ones are held out of it).
Eval records are never edited or scored here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rows import (  # noqa: E402
    load_train, mean_row, single_and_stream, train_edits_parser,
)

from mmke.config import build  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from mmke.protocols.sequential import Sequential  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

SETTINGS = [dict(L2=0.1), dict(L2=0.01), dict(L2=0.1, layers=[1, 2, 3]), dict(L2=0.1, layers=[0, 1, 2]),
            dict(L2=0.1, nullspace_threshold=1e-3), dict(L2=0.1, nullspace_threshold=1e-1),
            dict(L2=1.0), dict(L2=0.1, v_lr=0.1),
            dict(L2=0.01, layers=[0, 1, 2]), dict(L2=0.1, layers=[0, 1, 2], clamp_norm_factor=1.5),
            dict(L2=0.01, layers=[0, 1, 2], clamp_norm_factor=1.5, v_steps=40),
            dict(L2=0.01, layers=[1, 2]), dict(L2=1e-3, layers=[1, 2]),
            dict(L2=1e-3, layers=[1, 2], clamp_norm_factor=1.5, v_steps=40),
            dict(L2=0.01, layers=[1, 2], clamp_norm_factor=1.5, v_steps=40),
            dict(L2=0.01, layers=[1, 2], clamp_norm_factor=3.0, v_steps=40, v_weight_decay=0.1),
            dict(L2=0.01, layers=[0, 1, 2], clamp_norm_factor=1.5, v_steps=40),
            dict(L2=0.01, layers=[0], clamp_norm_factor=1.5, v_steps=40),
            dict(L2=0.01, layers=[0], clamp_norm_factor=4.0, v_steps=80, v_weight_decay=0.05),
            dict(L2=0.01, layers=[0, 1], clamp_norm_factor=4.0, v_steps=80, v_weight_decay=0.05),
            # 20-27: around the chosen settings again after the decay became the authors'
            # |δ|/|z0|^2 (20-23 the tiny BLIP-2's layers, 24-27 the Llama-style families')
            dict(L2=0.01, layers=[0, 1, 2], clamp_norm_factor=1.0, v_steps=40),
            dict(L2=0.01, layers=[0, 1, 2], clamp_norm_factor=1.5, v_steps=25),
            dict(L2=0.01, layers=[0, 1, 2], clamp_norm_factor=1.5, v_steps=40, v_weight_decay=2.0),
            dict(L2=0.01, layers=[0, 1, 2], clamp_norm_factor=0.75, v_steps=40),
            dict(L2=0.01, layers=[1, 2], clamp_norm_factor=1.0, v_steps=40),
            dict(L2=0.01, layers=[1, 2], clamp_norm_factor=1.5, v_steps=25),
            dict(L2=0.01, layers=[1, 2], clamp_norm_factor=1.5, v_steps=40, v_weight_decay=2.0),
            dict(L2=0.01, layers=[1, 2], clamp_norm_factor=0.75, v_steps=40)]

def main() -> None:
    parser = train_edits_parser(__doc__)
    parser.add_argument("--stream", type=int, default=20)
    parser.add_argument("--k0", type=int, default=1000)
    parser.add_argument("--only", type=int, nargs="*", help="indices of SETTINGS to run")
    args = parser.parse_args()
    backbone, source, train = load_train(args)
    edited, rest = train[-args.edits:], train[:-args.edits]
    node = compose_config(["editor=alphaedit", f"backbone={args.backbone}"]).editor
    evaluator = Evaluator(MetricSpec(), source.templates)
    chosen = args.only if args.only else range(len(SETTINGS))
    for index in chosen:
        setting = SETTINGS[index]
        editor = build(node, k0_records=args.k0, k0_data=[], progress=False, **setting)
        editor.attach(backbone, source.templates, train_records=lambda: rest)
        null = {layer: int(torch.linalg.matrix_rank(p)) for layer, p in editor.projectors.items()}
        start = time.perf_counter()
        single = SingleEdit().run(editor, evaluator, edited, sink=lambda row: None,
                                  progress=False)
        per_edit = (time.perf_counter() - start) / len(edited)
        stream = Sequential(T=args.stream).run(editor, evaluator, edited[:args.stream],
                                               sink=lambda row: None, progress=False)
        print(f"[{index}] {str(setting) or 'default':34} single: {mean_row(single)}  "
              f"({per_edit * 1000:.0f} ms/edit; null dims {null})", flush=True)
        print(f"{'':39} stream: {mean_row(stream)}", flush=True)


if __name__ == "__main__":
    main()
