"""Rebuild the default tiny families on this machine and compare them with the builds in a
reference cache (by default the one the CLI and the tests use). Prints figures; asserts nothing.

    python benchmarks/rebuild_tiny.py [--families tiny_blip2 ...] [--reference DIR] [--cache DIR]

Each family is built from scratch into ``--cache`` (default: a new temporary folder; an existing
folder's finished builds are reused), then compared with the reference cache's build of the same
key: how many weight tensors differ, the largest difference, and the build reports' knowledge
side by side. Float kernels follow the CPU, so a build made on another machine (a cache copied
from elsewhere) is not expected to be bit-identical to this machine's; the editor settings and
test bars were chosen on builds of a 2-core AMD EPYC without AVX-512. This tells how far a
machine lands. A full rebuild of the four families takes about 90 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmke.backbones.tiny.builder import DONE_MARKER, read_report  # noqa: E402
from mmke.backbones.tiny.compare import compare_builds  # noqa: E402
from tests.conftest import cache_dir, compose_config  # noqa: E402

FAMILIES = ["tiny_blip2", "tiny_llava", "tiny_minigpt4", "tiny_qwen2vl"]
REPORTED = ["vqa_orig", "vqa_t_loc", "vqa_m_loc", "caption_orig", "vqa_heldout_orig_rephrase"]


def finished_builds(cache: Path) -> list[Path]:
    """Every finished base build in ``cache`` (in-context stages, named ``<key>-context-...``,
    are built from a base and compared through it)."""
    return sorted(p.parent for p in (cache / "backbones").glob(f"*/*/{DONE_MARKER}")
                  if "-context-" not in p.parent.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--reference", type=Path, default=cache_dir(),
                        help="the cache whose builds are compared with (default: $MMKE_CACHE_DIR "
                             "or .cache/mmke)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where to rebuild (default: a new temporary folder)")
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="mmke-rebuild-"))
    print(f"building into {cache}, comparing with {args.reference}")
    for family in args.families:
        cfg = compose_config([f"backbone={family}", f"paths.cache_dir={cache}", "progress=true"])
        instantiate(cfg.backbone)
    for build in finished_builds(cache):
        reference = args.reference / "backbones" / build.parent.name / build.name
        report = read_report(build)
        print(f"\n{build.parent.name} {build.name}")
        if not (reference / DONE_MARKER).is_file():
            print("  the reference cache holds no build of this key")
            for key in REPORTED:
                if key in report:
                    print(f"  {key:28s} rebuilt {report[key]:.4f}")
            continue
        diff = compare_builds(build, reference)
        before = read_report(reference)
        print(f"  weights: {diff.differing}/{diff.tensors} tensors differ from the reference, "
              f"largest difference {diff.max_abs:.3g}" + (" (bit-identical)" if diff.identical else ""))
        for key in REPORTED:
            if key in report:
                print(f"  {key:28s} rebuilt {report[key]:.4f}  reference "
                      f"{before.get(key, float('nan')):.4f}")


if __name__ == "__main__":
    main()
