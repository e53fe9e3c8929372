"""The held-out eval split: the eval records asked in ways pretraining never paired with them.

The tiny backbones are pretrained on the train split, whose rephrases use every wording of
``QUESTION_TEMPLATES`` and ``CAPTION_PROMPTS``, and whose image rephrases are re-drawn on the same
backgrounds. On the plain eval split a text or image rephrase is therefore something the model
has already memorised the form of, and T-Gen / M-Gen measure little. Here each eval record keeps
its image, edit question, target and locality fields, and gets:

- a text rephrase in a wording no train record uses (``HELDOUT_QUESTION_TEMPLATES``: compositions
  of words the world already has, so the tokenizer and the model know every piece);
- an image rephrase drawn on a background no training picture has, with pixel noise
  (``HELDOUT_BACKGROUNDS``, ``NOISE_STD``);
- for E-IC, a target caption as far from the truth as MMEdit's are: the caption of another scene
  that shares no coloured object with the true one (MMEdit's counterfactual captions describe
  other pictures; version 5's recoloured one word, so an unedited model already scored about
  half the target's tokens).

Everything here draws from its own generator, so every file, picture and scene the tiny
backbones are pretrained on stays bit-identical (``tests/data/test_miniworld.py``), and so does
the tokenizer, which is trained on the four plain annotation files only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mmke.data.miniworld.questions import Question, caption
from mmke.data.miniworld.render import render
from mmke.data.miniworld.scene import Rendering, Scene, sample_rendering, sample_scene

# Seed of this module's generator, ``np.random.default_rng([spec.seed, HELDOUT_STREAM])``.
HELDOUT_STREAM = 11
HELDOUT_FILES = {"vqa": "vqa_eval_heldout.json", "caption": "caption_eval_heldout.json"}

# Wordings of each question kind that no train record uses; none equals a template of
# ``vocab.QUESTION_TEMPLATES`` (a test checks).
HELDOUT_QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("Which colour is the {shape}?", "What colour does the {shape} have?",
               "What is the colour of the {shape} in the picture?"),
    "shape": ("Which shape is the {colour} object?", "What shape is the {colour} one?",
              "What kind of shape is the {colour} object?"),
    "position": ("On which side of the picture is the {shape}?",
                 "Where in the picture is the {shape}?",
                 "In what part of the image is the {shape}?"),
    "size": ("Is the {shape} big or small?", "What size is the {shape} in the picture?",
             "How big is the {shape} in the image?"),
    "count": ("How many objects are in the picture?", "What is the number of objects in the image?",
              "Count the objects in the picture."),
    "existence": ("Is there a {shape} in the picture?", "Does the image contain a {shape}?",
                  "Can you see a {shape} in the picture?"),
}
HELDOUT_CAPTION_PROMPTS: tuple[str, ...] = ("a picture of", "an image showing", "a photo showing")
# Pale backgrounds no training picture has (``vocab.BACKGROUNDS`` are near-white and grey-blue).
HELDOUT_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((240, 222, 236), (222, 240, 222),
                                                         (245, 235, 200))
# Per-pixel Gaussian noise on the held-out image rephrase, in 0-255 units.
NOISE_STD = 6.0
# Rejection sampling of a caption scene sharing no object with the truth (about 1 in 2 pass).
_MAX_TRIES = 1000
# Fields of a caption row that assume a one-object recolouring edit (``extensions.caption_edit``);
# they do not hold for a whole-caption target, so the held-out caption rows leave them out.
_RECOLOUR_FIELDS = ("loc_same_image_q", "loc_same_image_a", "loc_similar_image",
                    "loc_similar_image_a")


def heldout_rows(vqa: list[dict], cap: list[dict], scenes: list[Scene],
                 questions: list[Question], rng: np.random.Generator, image_size: int,
                 max_jitter: int, out: Path) -> dict[str, list[dict]]:
    """The held-out VQA and caption rows of the eval split, by task; draws their pictures
    into ``out/images/eval/heldout``. ``vqa`` and ``cap`` are the plain eval rows (one caption
    row per scene, in ``scenes``' order); ``questions``: each VQA row's."""
    (out / "images" / "eval" / "heldout").mkdir(parents=True)
    pictures: dict[str, str] = {}  # a scene's picture -> its held-out rephrase
    for row, scene in zip(cap, scenes):
        path = f"images/eval/heldout/{Path(row['image']).stem}_h.png"
        heldout_picture(scene, rng, image_size, max_jitter).save(out / path)
        pictures[row["image"]] = path
    new_vqa = [{**row, "rephrase": _reworded(q, rng), "image_rephrase": pictures[row["image"]]}
               for row, q in zip(vqa, questions, strict=True)]
    new_cap = []
    for row, scene in zip(cap, scenes, strict=True):
        kept = {k: v for k, v in row.items() if k not in _RECOLOUR_FIELDS}
        prompt = HELDOUT_CAPTION_PROMPTS[int(rng.integers(0, len(HELDOUT_CAPTION_PROMPTS)))]
        new_cap.append({**kept, "rephrase": prompt, "image_rephrase": pictures[row["image"]],
                        "alt": caption(disjoint_scene(scene, rng))})
    return {"vqa": new_vqa, "caption": new_cap}


def heldout_picture(scene: Scene, rng: np.random.Generator, image_size: int,
                    max_jitter: int) -> Image.Image:
    """``scene`` drawn on a held-out background, with pixel noise."""
    drawn = sample_rendering(rng, len(scene.objects), max_jitter)
    background = HELDOUT_BACKGROUNDS[int(rng.integers(0, len(HELDOUT_BACKGROUNDS)))]
    img = render(scene, Rendering(background, drawn.jitter, drawn.scale), image_size)
    pixels = np.asarray(img, dtype=np.float32)
    noisy = pixels + rng.normal(0.0, NOISE_STD, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def disjoint_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """Another scene none of whose (colour, shape) objects ``scene`` has."""
    have = {(o.colour, o.shape) for o in scene.objects}
    for _ in range(_MAX_TRIES):
        other = sample_scene(rng)
        if not have & {(o.colour, o.shape) for o in other.objects}:
            return other
    raise RuntimeError(f"no scene disjoint from {caption(scene)!r} in {_MAX_TRIES} draws")


def _reworded(question: Question, rng: np.random.Generator) -> str:
    """``question`` in one of its kind's held-out wordings."""
    wordings = HELDOUT_QUESTION_TEMPLATES[question.kind]
    return wordings[int(rng.integers(0, len(wordings)))].format(**question.slots)
