"""LiveEdit's tiny settings, chosen on the TRAIN split (issue 13). Prints; asserts nothing.

    python benchmarks/liveedit_settings.py [--backbone tiny_blip2] [--held 100] [--stream 50]
                                           [--only 0,2]

For each candidate (``SETTINGS``, on top of ``editor=liveedit backbone=<backbone>``): fit on the
train split without its last ``--held`` records (cached under paths.cache_dir like any fit), then
edit those held-out train records, single and as one sequential stream of ``--stream``, each scored
by the real evaluator on the record's own prompts. LiveEdit's point is the stream: many experts in
the repository at once. Eval records are never fitted on, edited or scored here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rows import mean_row, single_and_stream  # noqa: E402

from mmke.config import build  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from tests.conftest import cache_dir  # noqa: E402

SETTINGS: list[list[str]] = [
    [],
    ["editor.training.lr=3e-3"],
    ["editor.training.steps=3000"],
    ["editor.training.batch_size=16", "editor.training.steps=1000"],
    ["editor.rank=8"],
    ["editor.training.steps=2500"],
]

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="tiny_blip2")
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--held", type=int, default=100)
    parser.add_argument("--stream", type=int, default=50)
    parser.add_argument("--only", default="", help="comma-separated indices of SETTINGS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(SETTINGS))
    backbone = source = None
    for index in chosen:
        overrides = [f"backbone={args.backbone}", f"data={args.data}", "editor=liveedit",
                     f"paths.cache_dir={cache_dir()}", "progress=false", *SETTINGS[index]]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        if backbone is None:
            backbone, source = instantiate(cfg.backbone), instantiate(cfg.data)
        train = source.records("train")
        fitted, held = train[:-args.held], train[-args.held:]
        editor = build(cfg.editor)
        editor.attach(backbone, source.templates)
        start = time.perf_counter()
        report = editor.fit(fitted)
        fit_s = time.perf_counter() - start
        evaluator = Evaluator(MetricSpec(), source.templates)
        single, stream = single_and_stream(editor, evaluator, held, args.stream)
        how = f"fit {fit_s / 60:.1f} min" if report.trained_now else "fit cached"
        print(f"{' '.join(SETTINGS[index]) or 'default':60} {how}", flush=True)
        print(f"{'':4} single: {mean_row(single)}", flush=True)
        print(f"{'':4} stream: {mean_row(stream)}", flush=True)


if __name__ == "__main__":
    main()
