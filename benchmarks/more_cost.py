"""M-ORE's per-edit cost over a long online stream (issue 11; M-ORE Figure 7, §5.4). Prints
figures and draws Figure 7; asserts nothing.

    python benchmarks/more_cost.py [--edits 1000] [--editors more,ft_l] [--out figures]

One ``python run.py protocol=online protocol.T=<edits> n_edits=<edits> eval=more`` run per editor
on the tiny BLIP-2 (one stream, no restore inside it), then, from each run's ``edits.jsonl``:
- the median editor time (``edit_s``) of edits 10-110 and of the last 100, and their ratio
  (M-ORE's claim: constant per-edit cost, target <= 1.1x);
- the incremental peak memory (``incremental_mem_mb``: the peak over the memory before the first
  edit) at the start and the end of the stream (target: flat);
- the edit loop's wall time (``cost.loop_s``), evaluation included.
Figure 7 (``mmke.tables.more_figure7``) is drawn from the same runs. Time it on a quiet machine:
a second busy process on two cores makes torch's threads collapse.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmke.tables import more_figure7  # noqa: E402


def run(editor: str, edits: int, folder: Path) -> None:
    env = {**os.environ,
           "MMKE_CACHE_DIR": os.environ.get("MMKE_CACHE_DIR", str(ROOT / ".cache" / "mmke"))}
    subprocess.run([sys.executable, str(ROOT / "run.py"), f"editor={editor}", "protocol=online",
                    f"protocol.T={edits}", f"n_edits={edits}", "eval=more", "progress=false",
                    f"hydra.run.dir={folder}"], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)


def report(editor: str, folder: Path) -> None:
    rows = [json.loads(line) for line in (folder / "edits.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["index"])
    times = [1000 * r["edit_s"] for r in rows]
    early, late = statistics.median(times[10:110]), statistics.median(times[-100:])
    memory = [r.get("incremental_mem_mb") or 0.0 for r in rows]
    loop = json.loads((folder / "summary.json").read_text())["cost"]["loop_s"]
    print(f"{editor:6} median edit {early:7.1f} ms (edits 10-110)  {late:7.1f} ms (last 100)  "
          f"ratio {late / early:4.2f}  incremental peak {max(memory[:110]):6.1f} -> "
          f"{max(memory[-100:]):6.1f} MB  loop {loop:6.1f} s for {len(rows)} edits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--editors", default="more,ft_l")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "figures"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for editor in args.editors.split(","):
            folder = Path(tmp) / editor
            run(editor, args.edits, folder)
            report(editor, folder)
            folders.append(folder)
        for path in more_figure7(folders, args.out):
            print(f"figure: {path}")


if __name__ == "__main__":
    main()
