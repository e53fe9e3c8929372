"""IKE on the tiny families (issue 14): its scores beside the unedited model's, and what its
context costs beside FT. Prints; asserts nothing.

    python benchmarks/ike_report.py [--backbones tiny_blip2,tiny_llava] [--data mini_vqa]
                                    [--edits 100] [--stream 20]

Per backbone, through ``python run.py`` (single protocol, ``--edits`` eval records):
- ``editor=none`` on the base build, then on the build with the in-context stage
  (``backbone.in_context.enabled=true``): the stage must keep the knowledge (Rel of the
  unedited model is its knowledge of the new answers, T-Loc/M-Loc are 100 by definition);
- ``editor=ike`` (its pair config turns the stage on), single edits and one sequential stream of
  ``--stream`` edits;
- ``editor=ike`` on the base build (``backbone.in_context.enabled=false`` with a k that fits):
  the tiny backbone without the stage reads no context, which is why the stage exists;
- ``editor=ike eval.loc_positions=target``: locality read at the answer positions only (the
  default ``easyedit`` convention compares every position, and IKE's context shifts them all);
- ``editor=ft`` on the in-context build: evaluation seconds per edit beside IKE's.
Then, in-process, the mean token length of the prompts IKE's evaluation reads, against the
same prompts without context. Time it on a quiet machine: a second busy process on two cores
makes torch's threads collapse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import METRICS  # noqa: E402

ON = "backbone.in_context.enabled=true"
OFF = "backbone.in_context.enabled=false"


def run(overrides: list[str], folder: Path, cache: str) -> dict:
    env = {**os.environ, "MMKE_CACHE_DIR": cache}
    subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides, "progress=false",
                    f"hydra.run.dir={folder}"], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return json.loads((folder / "summary.json").read_text())


def line(label: str, summary: dict) -> str:
    cells = []
    for m in METRICS:
        v = summary.get(m)
        cells.append("     -" if v is None else f"{float(v):6.1f}")
    cost = summary.get("cost", {})
    return (f"{label:26} " + "  ".join(cells)
            + f"   edit {cost.get('edit_s', 0):6.3f}s  eval {cost.get('eval_s', 0):6.3f}s")


def prompt_lengths(backbone: str, data: str, edits: int) -> tuple[float, float]:
    """Mean token length of the five evaluation prompts of ``edits`` single IKE edits, with
    and without IKE's context (image tokens included)."""
    from mmke.config import build
    from mmke.data.prompts import edit_prompts
    from tests.conftest import compose_config

    cfg = compose_config(["editor=ike", f"backbone={backbone}", f"data={data}", "progress=false"])
    source = build(cfg.data)
    model = build(cfg.backbone)
    editor = build(cfg.editor)
    train = source.records("train")
    editor.attach(model, source.templates, train_records=lambda: train)
    plain, ctx = [], []
    for record in source.records("eval", limit=edits):
        prompts = edit_prompts(record, source.templates)
        editor.edit([record])
        plain += [len(model.encode(p).input_ids) for p in prompts]
        ctx += [len(model.encode(p).input_ids) for p in editor.prepare_prompts(prompts)]
        editor.restore()
    return sum(plain) / len(plain), sum(ctx) / len(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="tiny_blip2")
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--stream", type=int, default=20)
    parser.add_argument("--base-k", type=int, default=0,
                        help="IKE's k on the base build (its short context fits few or none)")
    args = parser.parse_args()
    cache = os.environ.get("MMKE_CACHE_DIR", str(ROOT / ".cache" / "mmke"))
    for backbone in args.backbones.split(","):
        common = [f"backbone={backbone}", f"data={args.data}", f"n_edits={args.edits}"]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            print(f"\n{backbone} on {args.data}, {args.edits} eval edits (single protocol)")
            print(f"{'':26} " + "  ".join(f"{m:>6}" for m in METRICS))
            print(line("unedited, base build", run(["editor=none", *common], out / "a", cache)),
                  flush=True)
            print(line("unedited, in-context build",
                       run(["editor=none", ON, *common], out / "b", cache)), flush=True)
            print(line("IKE", run(["editor=ike", *common], out / "c", cache)), flush=True)
            streamed = run(["editor=ike", "protocol=sequential", f"protocol.T={args.stream}",
                            *common[:-1], f"n_edits={args.stream}"], out / "d", cache)
            print(line(f"IKE, a stream of {args.stream}", streamed), flush=True)
            print(line("IKE, loc_positions=target",
                       run(["editor=ike", "eval.loc_positions=target", *common], out / "g", cache)),
                  flush=True)
            label = f"IKE k={args.base_k}, base build"
            try:
                print(line(label, run(["editor=ike", OFF, f"editor.k={args.base_k}", *common],
                                      out / "e", cache)), flush=True)
            except subprocess.CalledProcessError as err:
                # the last "error:" line, not stderr's tail (progress bars share it)
                errors = [ln for ln in err.stderr.splitlines() if ln.startswith("error:")]
                print(f"{label:26} stops before its first edit: "
                      f"{(errors or [err.stderr.strip()])[-1][-240:]}",
                      flush=True)
            print(line("FT, in-context build", run(["editor=ft", ON, *common], out / "f", cache)),
                  flush=True)
        plain, ctx = prompt_lengths(backbone, args.data, min(args.edits, 20))
        print(f"mean prompt length: {plain:.0f} tokens plain (FT reads these), {ctx:.0f} with "
              f"IKE's context ({ctx / plain:.1f}x)")


if __name__ == "__main__":
    main()
