"""Rebuild the default tiny families on this machine and compare them with the builds the package
ships (``mmke/backbones/tiny/shipped``). Prints figures; asserts nothing.

    python benchmarks/rebuild_tiny.py [--families tiny_blip2 ...] [--cache DIR] [--ship]

Each family is built from scratch (``backbone.shipped=false``) into ``--cache`` (default: a new
temporary folder; an existing folder's finished builds are reused), then compared with the shipped
build of the same key: how many weight tensors differ, the largest difference, and the build
reports' knowledge side by side. Float kernels follow the CPU, so another machine's rebuild is
not expected to be bit-identical; this tells how far it lands. ``--ship`` copies the new builds
into the package folder (one per family, older keys removed): do that when a recipe or a default
setting changed, then run the tests, whose bars and editor settings are chosen on those builds.
A full rebuild of the four families takes about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmke.backbones.tiny.builder import DONE_MARKER, SHIPPED, read_report  # noqa: E402
from mmke.backbones.tiny.shipping import compare_builds, ship_build  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

FAMILIES = ["tiny_blip2", "tiny_llava", "tiny_minigpt4", "tiny_qwen2vl"]
REPORTED = ["vqa_orig", "vqa_t_loc", "vqa_m_loc", "caption_orig", "vqa_heldout_orig_rephrase"]


def finished_builds(cache: Path) -> list[Path]:
    """Every finished base build in ``cache`` (in-context stages, named ``<key>-context-...``,
    are not shipped)."""
    return sorted(p.parent for p in (cache / "backbones").glob(f"*/*/{DONE_MARKER}")
                  if "-context-" not in p.parent.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--cache", type=Path, default=None,
                        help="where to build (default: a new temporary folder)")
    parser.add_argument("--ship", action="store_true",
                        help="copy the new builds into the package's shipped folder")
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="mmke-rebuild-"))
    print(f"building into {cache}")
    for family in args.families:
        cfg = compose_config([f"backbone={family}", f"paths.cache_dir={cache}",
                              "backbone.shipped=false", "progress=true"])
        instantiate(cfg.backbone)
    for build in finished_builds(cache):
        shipped = SHIPPED / build.parent.name / build.name
        report = read_report(build)
        print(f"\n{build.parent.name} {build.name}")
        if (shipped / DONE_MARKER).is_file():
            diff = compare_builds(build, shipped)
            before = read_report(shipped)
            print(f"  weights: {diff.differing}/{diff.tensors} tensors differ from the shipped "
                  f"build, largest difference {diff.max_abs:.3g}"
                  + (" (bit-identical)" if diff.identical else ""))
            for key in REPORTED:
                if key in report:
                    print(f"  {key:28s} rebuilt {report[key]:.4f}  shipped {before.get(key, float('nan')):.4f}")
        else:
            print("  no shipped build has this key (new settings or recipe)")
            for key in REPORTED:
                if key in report:
                    print(f"  {key:28s} rebuilt {report[key]:.4f}")
        if args.ship:
            print(f"  shipped to {ship_build(build, SHIPPED).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
