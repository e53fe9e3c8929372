"""Speed and memory figures for the spine (issue 2). Prints figures; asserts nothing.

    python benchmarks/spine.py [--records 50] [--skip-cli] [--cold]

1. Evaluation: forwards per evaluated edit and wall time of mmke's batched evaluator against
   EasyEdit-style evaluation (each prompt in its own forward: 5 pre-edit + 5 post-edit passes
   of batch 1 per edit), on the cached tiny BLIP-2, single-edit protocol.
2. restore(): FT's snapshot restore against a deep copy of the model.
3. `python run.py` on the cached default: wall time and peak memory (and, with --cold, the
   first run including the mini world and the tiny pretraining, in a fresh cache).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmke.data.prompts import edit_prompts  # noqa: E402
from mmke.editors.base import NoEdit  # noqa: E402
from mmke.editors.ft import FineTune  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402


def cache_dir() -> str:
    return os.environ.get("MMKE_CACHE_DIR", str(ROOT / ".cache" / "mmke"))


def load(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.cache_dir={cache_dir()}",
                                                        "progress=false", *overrides])
    return instantiate(cfg.backbone), instantiate(cfg.data)


@torch.no_grad()
def easyedit_style(backbone, editor, records, templates) -> tuple[float, int]:
    """Each prompt in its own forward: 5 pre-edit passes and 5 post-edit passes per edit."""
    forwards = 0
    start = time.perf_counter()
    for record in records:
        for model_forward in (backbone.forward, editor.forward):  # pre, then post
            for prompt in edit_prompts(record, templates):
                model_forward(backbone.prepare([prompt]))
                forwards += 1
    return time.perf_counter() - start, forwards


def bench_evaluation(backbone, source, n: int) -> None:
    records = source.records("eval", limit=n)
    editor = NoEdit()  # the model state is fixed, so only evaluation is timed
    editor.attach(backbone, source.templates)
    # Warm-up: decode every picture into the pixel cache, so both sides time the model alone.
    backbone.prepare([p for r in records for p in edit_prompts(r, source.templates)])
    easyedit_style(backbone, editor, records[:2], source.templates)
    evaluator = Evaluator(MetricSpec(), source.templates)
    start = time.perf_counter()
    SingleEdit().run(editor, evaluator, records, lambda row: None, progress=False)
    ours = time.perf_counter() - start
    theirs, their_forwards = easyedit_style(backbone, editor, records, source.templates)
    print(f"[evaluation] {n} single edits on {backbone.name}")
    print(f"  mmke batched : {evaluator.forwards / n:5.2f} forwards/edit  {ours:7.3f} s  "
          f"({1000 * ours / n:.1f} ms/edit)")
    print(f"  EasyEdit-style: {their_forwards / n:5.2f} forwards/edit  {theirs:7.3f} s  "
          f"({1000 * theirs / n:.1f} ms/edit)")
    print(f"  speed-up      : {theirs / ours:.1f}x (target >= 4x)")


def bench_restore(backbone, source) -> None:
    editor = FineTune()
    editor.attach(backbone, source.templates)
    editor.edit(source.records("eval", limit=1))
    snapshot_bytes = editor.snapshot.nbytes
    start = time.perf_counter()
    editor.restore()
    restore_s = time.perf_counter() - start
    model = backbone.model
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    start = time.perf_counter()
    saved = copy.deepcopy(model.state_dict())
    model.load_state_dict(saved)
    deepcopy_s = time.perf_counter() - start
    print("[restore] FT, 3 layers x FFN in/out")
    print(f"  snapshot restore: {snapshot_bytes / 1e6:7.3f} MB copied  {1e3 * restore_s:8.3f} ms")
    print(f"  deep copy + load: {model_bytes / 1e6:7.3f} MB copied  {1e3 * deepcopy_s:8.3f} ms")


def bench_cli(cold: bool) -> None:
    def run(env_cache: str, label: str) -> None:
        env = {**os.environ, "MMKE_CACHE_DIR": env_cache}
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "run.py", "progress=false", f"hydra.run.dir={out}/run"],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"[cli] python run.py, {label}: {wall:6.1f} s wall, peak RSS {peak:6.0f} MB")

    run(cache_dir(), "cached default (target < 60 s, < 2 GB)")
    if cold:
        with tempfile.TemporaryDirectory() as fresh:
            run(fresh, "cold cache incl. mini world + tiny pretraining (target < 10 min)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50)
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--cold", action="store_true", help="also time a first run from scratch")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    backbone, source = load([])
    bench_evaluation(backbone, source, args.records)
    bench_restore(backbone, source)
    if not args.skip_cli:
        bench_cli(args.cold)


if __name__ == "__main__":
    main()
