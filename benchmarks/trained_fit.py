"""Trained editors (issue 13): the time of ``fit`` with the default tiny settings, and the edit
quality of the fitted editor on the eval split beside the unedited model's. Prints; asserts
nothing.

    python benchmarks/trained_fit.py [--editors liveedit] [--backbone tiny_blip2] [--edits 100]
                                     [--cold] [--set editor.training.steps=500 ...]

Per editor: ``python run.py editor=<e> train_only=true`` (timed; ``--cold`` trains into an
empty cache folder, so the fit is measured rather than loaded), then ``python run.py editor=<e>
n_edits=<edits>`` (loads the fit), and once ``editor=none`` for the unedited rows. Target: each
fit under 10 minutes on 2 cores. Time it on a quiet machine: a second busy process on two cores
makes torch's threads collapse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import METRICS  # noqa: E402


def run(overrides: list[str], folder: Path, cache: str) -> dict:
    env = {**os.environ, "MMKE_CACHE_DIR": cache}
    subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides, "progress=false",
                    f"hydra.run.dir={folder}"], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    summary = folder / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def value(summary: dict, metric: str) -> float | None:
    entry = summary.get(metric)
    return None if entry is None else float(entry)


def line(label: str, summary: dict, fit: str = "") -> str:
    cells = "  ".join("     -" if value(summary, m) is None else f"{value(summary, m):6.1f}"
                      for m in METRICS)
    return f"{label:10} {fit:>14}  {cells}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--editors", default="liveedit")
    parser.add_argument("--backbone", default="tiny_blip2")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--cold", action="store_true", help="fit into an empty cache folder")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every editor")
    args = parser.parse_args()
    cache = os.environ.get("MMKE_CACHE_DIR", str(ROOT / ".cache" / "mmke"))
    common = [f"backbone={args.backbone}", *args.set]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base = run(["editor=none", f"n_edits={args.edits}", *common], out / "none", cache)
        print(f"{args.backbone}, {args.edits} eval edits (single protocol)")
        print(f"{'editor':10} {'fit':>14}  " + "  ".join(f"{m:>6}" for m in METRICS))
        print(line("unedited", base))
        for editor in args.editors.split(","):
            fit_cache = [f"editor.cache_dir={out / 'cold' / editor}"] if args.cold else []
            start = time.perf_counter()
            run([f"editor={editor}", "train_only=true", *common, *fit_cache], out / "fit", cache)
            seconds = time.perf_counter() - start
            summary = run([f"editor={editor}", f"n_edits={args.edits}", *common, *fit_cache],
                          out / editor, cache)
            print(line(editor, summary, f"{seconds / 60:5.1f} min"), flush=True)


if __name__ == "__main__":
    main()
