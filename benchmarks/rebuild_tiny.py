"""Rebuild the default tiny builds on this machine and compare them with the shipped set
(``mmke/backbones/tiny/shipped``): weights tensor by tensor, and the build reports side by side.
Prints figures; asserts nothing. With ``--ship`` the rebuilt builds become the shipped set (all of it).

    python benchmarks/rebuild_tiny.py [--families tiny_blip2 ...] [--no-context] [--cache DIR]
                                      [--ship]

Each family's default build, and its in-context stage (IKE's ``backbone.in_context.enabled=true``)
unless ``--no-context``, is built with ``backbone.shipped=false`` into ``--cache`` (default: a new
temporary folder; finished builds already there are reused, so ``--cache`` with a previous
rebuild ships it without training again). Float kernels follow the CPU, so a rebuild on another
machine is not expected to be bit-identical to the shipped set; this tells how far it lands. A full
rebuild takes about 90 minutes on 2 cores, the in-context stages about 14 minutes more each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmke.backbones.tiny.blip2 import tiny_blip2_build  # noqa: E402
from mmke.backbones.tiny.builder import read_report  # noqa: E402
from mmke.backbones.tiny.compare import compare_builds  # noqa: E402
from mmke.backbones.tiny.llava import tiny_llava_build  # noqa: E402
from mmke.backbones.tiny.minigpt4 import tiny_minigpt4_build  # noqa: E402
from mmke.backbones.tiny.qwen2vl import tiny_qwen2vl_build  # noqa: E402
from mmke.backbones.tiny.shipping import SHIPPED, find_shipped, ship, this_machine  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

#: each family's function that makes (or finds) the folders its backbone loads
BUILDS = {"tiny_blip2": tiny_blip2_build, "tiny_llava": tiny_llava_build,
          "tiny_minigpt4": tiny_minigpt4_build, "tiny_qwen2vl": tiny_qwen2vl_build}
FAMILIES = list(BUILDS)
LOADING = ("_target_", "_convert_", "_recursive_", "dtype", "device", "name")
REPORTED = ["vqa_orig", "vqa_t_loc", "vqa_m_loc", "caption_orig", "vqa_heldout_orig_rephrase",
            "context_final_loss"]


def rebuild(families: list[str], cache: Path, context: bool) -> list[Path]:
    """The folders of every family's default build (and in-context stage) in ``cache``, built
    here (``backbone.shipped=false``) unless finished there already; a stage's base included."""
    folders: set[Path] = set()
    for family in families:
        for stage in ([False, True] if context else [False]):
            cfg = compose_config([f"backbone={family}", f"paths.cache_dir={cache}",
                                  "backbone.shipped=false", "progress=true",
                                  f"backbone.in_context.enabled={str(stage).lower()}"])
            settings = OmegaConf.to_container(cfg.backbone, resolve=True)
            for key in LOADING:
                settings.pop(key, None)
            made = BUILDS[family](**settings)
            folders.update(made if isinstance(made, tuple) else (made,))
    bases = {f.with_name(f.name.split("-context-")[0]) for f in folders}
    return sorted(folders | bases)


def compare(build: Path) -> None:
    """Print how ``build`` lies from the shipped build of the same family and key."""
    report = read_report(build)
    print(f"\n{build.parent.name} {build.name}")
    shipped = find_shipped(build, SHIPPED)
    if shipped is None:
        print("  nothing shipped answers to this key")
        before: dict = {}
    else:
        diff = compare_builds(build, shipped.folder)
        before = read_report(shipped.folder)
        print(f"  weights: {diff.differing}/{diff.tensors} tensors differ from the shipped build "
              f"(built on {shipped.built_on.get('cpu')}, AVX-512: "
              f"{'yes' if shipped.built_on.get('avx512') else 'no'}), largest difference "
              f"{diff.max_abs:.3g}" + (" (bit-identical)" if diff.identical else ""))
    for key in REPORTED:
        if key in report:
            print(f"  {key:28s} rebuilt {report[key]:.4f}  shipped "
                  f"{before.get(key, float('nan')):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--no-context", action="store_true",
                        help="leave out the in-context stages")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where to rebuild (default: a new temporary folder)")
    parser.add_argument("--ship", action="store_true",
                        help="write the rebuilt builds as the shipped set, with its manifest")
    args = parser.parse_args()
    if args.ship and (args.no_context or set(args.families) != set(FAMILIES)):
        parser.error("--ship writes the whole shipped set: every family and its in-context stage "
                     "(drop --families and --no-context)")
    cache = args.cache or Path(tempfile.mkdtemp(prefix="mmke-rebuild-"))
    machine = this_machine()
    print(f"building into {cache} on {machine['cpu']} ({machine['cores']} cores, AVX-512: "
          f"{' '.join(machine['avx512']) or 'none'}), comparing with the shipped set")
    builds = rebuild(args.families, cache, not args.no_context)
    for build in builds:
        compare(build)
    if args.ship:
        manifest = ship(builds, SHIPPED, machine)
        size = sum(m["bytes"] for e in manifest["builds"].values() for m in e["files"].values())
        print(f"\nshipped {len(manifest['builds'])} builds, {size / 1e6:.1f} MB, into {SHIPPED}")


if __name__ == "__main__":
    main()
