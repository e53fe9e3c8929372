"""Write the mini world to disk in the exact MMEdit schema (JSON records + PNG images).

Deterministic from ``MiniWorldSpec`` (seed included); cached under a folder named by the spec's
hash, built in a temporary folder and renamed into place, so a crash never leaves a half world.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mmke.data.miniworld.extensions import (EXTRA_STREAM, caption_edit, onehop, similar_scene,
                                            unrelated_question)
from mmke.data.miniworld.facts import Fact, fact_bank
from mmke.data.miniworld.heldout import HELDOUT_FILES, HELDOUT_STREAM, heldout_rows
from mmke.data.miniworld.questions import (Question, answer, ask, caption, caption_prompts,
                                           counterfactual_caption)
from mmke.data.miniworld.render import render
from mmke.data.miniworld.scene import Scene, sample_rendering, sample_scene
from mmke.data.miniworld.vocab import QUESTION_TEMPLATES

# Bump when the generator's output changes for the same spec, so caches are rebuilt.
# 5: one-hop portability (``port_new``) and the DE-VQA locality fields (``loc_*``), drawn from a
# second generator so that everything version 4 wrote is unchanged.
# 6: the held-out eval split (``heldout.py``), drawn from a third generator, new files only.
GENERATOR_VERSION = 6
ANNOTATION_FILES = {("vqa", "train"): "vqa_train.json", ("vqa", "eval"): "vqa_eval.json",
                    ("caption", "train"): "caption_train_edit.json",
                    ("caption", "eval"): "caption_eval_edit.json"}
PROBE_CATEGORIES = ("existence", "count", "position", "colour")
SIMILAR_SCENES_FILE = "scenes_similar.json"


@dataclass(frozen=True)
class MiniWorldSpec:
    """Everything the generated files depend on."""

    seed: int = 0
    image_size: int = 48
    train_scenes: int = 1500
    eval_scenes: int = 400
    questions_per_scene: int = 3
    loc_scenes: int = 200
    fact_subjects: int = 60
    probes_per_category: int = 100
    max_jitter: int = 1

    def settings(self) -> dict:
        """What the world's key is made of: the generator's version and every setting."""
        return {"v": GENERATOR_VERSION, **asdict(self)}

    def key(self) -> str:
        payload = json.dumps(self.settings(), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def ensure_miniworld(cache_dir: str | Path, spec: MiniWorldSpec) -> Path:
    """The folder of the world for ``spec``, generating it the first time."""
    root = Path(cache_dir) / "miniworld" / spec.key()
    if (root / "manifest.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root.parent))
    try:
        write_world(tmp, spec)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def write_world(out: Path, spec: MiniWorldSpec) -> None:
    rng = np.random.default_rng(spec.seed)
    extra = np.random.default_rng([spec.seed, EXTRA_STREAM])  # new fields only; see extensions.py
    held = np.random.default_rng([spec.seed, HELDOUT_STREAM])  # new files only; see heldout.py
    similar: dict[str, dict[str, list[dict]]] = {}
    facts = fact_bank(rng, spec.fact_subjects)
    counts: dict[str, int] = {}
    annotations: dict[str, dict[str, list[dict]]] = {}
    for split, n_scenes in (("train", spec.train_scenes), ("eval", spec.eval_scenes)):
        scenes = [sample_scene(rng) for _ in range(n_scenes)]
        loc_scenes = [sample_scene(rng) for _ in range(spec.loc_scenes)]
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True)
        for i, scene in enumerate(scenes):
            _save(scene, rng, spec, img_dir / f"s{i:05d}.png")
            _save(scene, rng, spec, img_dir / f"s{i:05d}_r.png")
        for j, scene in enumerate(loc_scenes):
            _save(scene, rng, spec, img_dir / f"l{j:05d}.png")
        annotations[split] = {f"images/{split}/{name}.png": [asdict(o) for o in scene.objects]
                              for i, scene in enumerate(scenes) for name in (f"s{i:05d}", f"s{i:05d}_r")}
        annotations[split].update({f"images/{split}/l{j:05d}.png": [asdict(o) for o in scene.objects]
                                   for j, scene in enumerate(loc_scenes)})
        vqa, cap = [], []
        asked: list[tuple[Scene, Question]] = []  # per VQA row, for the fields drawn from ``extra``
        for i, scene in enumerate(scenes):
            base = {"image": f"images/{split}/s{i:05d}.png",
                    "image_rephrase": f"images/{split}/s{i:05d}_r.png"}
            kinds = rng.choice(list(QUESTION_TEMPLATES), size=spec.questions_per_scene, replace=False)
            for kind in kinds:
                q = ask(scene, str(kind), rng)
                vqa.append({"src": q.texts[0], "pred": q.answer,
                            "rephrase": q.texts[int(rng.integers(1, len(q.texts)))],
                            "alt": q.alternatives[int(rng.integers(0, len(q.alternatives)))],
                            **base, **_locality(rng, facts, loc_scenes, split), "kind": str(kind)})
                asked.append((scene, q))
            prompts = caption_prompts()
            cap.append({"src": prompts[0], "pred": caption(scene),
                        "rephrase": prompts[int(rng.integers(1, len(prompts)))],
                        "alt": counterfactual_caption(scene, rng),
                        **base, **_locality(rng, facts, loc_scenes, split)})
        similar[split] = _extend(vqa, asked, cap, scenes, split, extra, spec, out)
        if split == "eval":
            rows = heldout_rows(vqa, cap, scenes, [q for _, q in asked], held, spec.image_size,
                                spec.max_jitter, out)
            for task, name in HELDOUT_FILES.items():
                (out / name).write_text(json.dumps(rows[task], indent=1))
                counts[name] = len(rows[task])
        for (task, s), name in ANNOTATION_FILES.items():
            if s == split:
                records = vqa if task == "vqa" else cap
                (out / name).write_text(json.dumps(records, indent=1))
                counts[name] = len(records)
    counts.update(_write_probes(out, rng, spec))
    (out / "facts.json").write_text(json.dumps([asdict(f) for f in facts], indent=1))
    # What every picture shows, as COCO ships object annotations beside its images.
    (out / "scenes.json").write_text(json.dumps(annotations))
    # The similar-image pictures, apart: stage 1 of the tiny backbones trains on every picture of
    # scenes.json, which must stay as it was.
    (out / SIMILAR_SCENES_FILE).write_text(json.dumps(similar))
    manifest = {"generator_version": GENERATOR_VERSION, "spec": asdict(spec), "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks completeness


def _extend(vqa: list[dict], asked: list[tuple[Scene, Question]], cap: list[dict],
            scenes: list[Scene], split: str, rng: np.random.Generator, spec: MiniWorldSpec,
            out: Path) -> dict[str, list[dict]]:
    """Add ``port_new`` and the locality-set fields to the rows of one split (new keys only), draw
    the similar-image pictures; returns what those pictures show, by path.

    ``rng`` is the world's second generator: nothing here may touch the main one.
    """
    folder = out / "images" / split / "similar"
    folder.mkdir()
    shown: dict[str, list[dict]] = {}

    def draw(scene: Scene, slots: dict[str, str], name: str) -> tuple[str, Scene]:
        other = similar_scene(scene, slots, rng)
        path = f"images/{split}/similar/{name}.png"
        _save(other, rng, spec, out / path)
        shown[path] = [asdict(o) for o in other.objects]
        return path, other

    for n, (row, (scene, q)) in enumerate(zip(vqa, asked)):
        if port := onehop(scene, q, row["alt"]):
            row["port_new"] = port
        if same := unrelated_question(scene, q.kind, q.mentions() | {row["alt"]}, rng):
            row["loc_same_image_q"], row["loc_same_image_a"] = same.texts[0], same.answer
        path, other = draw(scene, q.slots, f"vqa{n:05d}")
        row["loc_similar_image"] = path
        row["loc_similar_image_a"] = answer(other, q.kind, q.slots)  # not None: it holds the object
    for i, (row, scene) in enumerate(zip(cap, scenes)):
        # E-IC's edit recolours one object: the same-image question avoids that object and both
        # colours; the similar picture holds an object of the same shape, captioned truly.
        obj, new = caption_edit(scene, row["alt"])
        if same := unrelated_question(scene, "caption", {obj.shape, obj.colour, new}, rng):
            row["loc_same_image_q"], row["loc_same_image_a"] = same.texts[0], same.answer
        path, other = draw(scene, {"shape": obj.shape}, f"cap{i:05d}")
        row["loc_similar_image"] = path
        row["loc_similar_image_a"] = caption(other)
    return shown


def _save(scene: Scene, rng: np.random.Generator, spec: MiniWorldSpec, path: Path) -> None:
    rendering = sample_rendering(rng, len(scene.objects), spec.max_jitter)
    render(scene, rendering, spec.image_size).save(path)


def _locality(rng: np.random.Generator, facts: list[Fact], loc_scenes: list[Scene],
              split: str) -> dict[str, str]:
    """A text-locality fact and an OK-VQA-like question about another picture."""
    fact = facts[int(rng.integers(0, len(facts)))]
    j = int(rng.integers(0, len(loc_scenes)))
    kind = list(QUESTION_TEMPLATES)[int(rng.integers(0, len(QUESTION_TEMPLATES)))]
    q = ask(loc_scenes[j], kind, rng)
    return {"loc": fact.question, "loc_ans": fact.answer, "m_loc": f"images/{split}/l{j:05d}.png",
            "m_loc_q": q.texts[int(rng.integers(0, len(q.texts)))], "m_loc_a": q.answer}


def _write_probes(out: Path, rng: np.random.Generator, spec: MiniWorldSpec) -> dict[str, int]:
    """MME-style probe sets (existence, count, position, colour) on scenes of their own."""
    probe_dir = out / "images" / "probes"
    probe_dir.mkdir(parents=True)
    (out / "probes").mkdir()
    counts = {}
    for category in PROBE_CATEGORIES:
        rows = []
        for i in range(spec.probes_per_category):
            scene = sample_scene(rng)
            path = f"images/probes/{category}_{i:04d}.png"
            _save(scene, rng, spec, out / path)
            q = ask(scene, category, rng)
            rows.append({"image": path, "question": q.texts[0], "answer": q.answer,
                         "category": category})
        (out / "probes" / f"{category}.json").write_text(json.dumps(rows, indent=1))
        counts[f"probes/{category}.json"] = len(rows)
    return counts
