"""Per-family cost of the tiny backbones (issue 3). Prints figures; asserts nothing.

    python benchmarks/families.py [--batch 32] [--repeats 5] [--families tiny_blip2 tiny_llava ...]

For each family: parameters (total, language model, vision side), image tokens per picture, the
padded length of an E-VQA-mini batch, and the median wall time of one forward and of one
forward+backward (the inner step of every loss-based editor) on that batch. The tiny backbones
come from the cache (built on first use, several minutes each).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmke.data.prompts import edit_prompts  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

FAMILIES = ["tiny_blip2", "tiny_minigpt4", "tiny_llava", "tiny_qwen2vl"]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", nargs="*", default=FAMILIES)
    args = parser.parse_args()
    source = instantiate(compose_config().data)
    records = source.records("eval", limit=args.batch)
    prompts = [edit_prompts(r, source.templates)[0] for r in records]
    print(f"{'backbone':<15}{'params':>10}{'language':>10}{'vision':>9}{'img tok':>8}"
          f"{'seq len':>8}{'fwd ms':>9}{'fwd+bwd ms':>12}")
    for name in args.families:
        backbone = instantiate(compose_config([f"backbone={name}"]).backbone)
        model, mods = backbone.model, backbone.modules
        total = sum(p.numel() for p in model.parameters())
        language = sum(p.numel() for i in range(mods.num_language_layers)
                       for p in mods.language_layer(i).parameters())
        vision = sum(p.numel() for p in mods.vision_tower().parameters())
        batch = backbone.prepare(prompts)

        def forward() -> None:
            with torch.no_grad():
                backbone.forward(batch)

        def forward_backward() -> None:
            model.zero_grad(set_to_none=True)
            backbone.nll(batch, backbone.forward(batch)).backward()

        fwd, both = timed(forward, args.repeats), timed(forward_backward, args.repeats)
        model.zero_grad(set_to_none=True)
        print(f"{name:<15}{total:>10,}{language:>10,}{vision:>9,}"
              f"{backbone.image_token_count(records[0].image):>8}{batch.input_ids.shape[1]:>8}"
              f"{1000 * fwd:>9.1f}{1000 * both:>12.1f}")
    print(f"(batch of {args.batch} E-VQA-mini edit prompts; 'language' counts the decoder layers, "
          "'vision' the vision tower; median of {args.repeats} runs)".replace("{args.repeats}",
                                                                         str(args.repeats)))


if __name__ == "__main__":
    main()
