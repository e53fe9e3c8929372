"""Probe sets: MME's released layout (both variants) read from a tiny fake tree, MME's accuracy
and accuracy+ on hand-built answers, clear errors, and the eval settings' checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mmke.data.prompts import PromptTemplates
from mmke.errors import ConfigError, DataError
from mmke.evaluation.probe_sets import load_probe_set, mme_probes
from mmke.evaluation.probes import score_categories
from mmke.evaluation.spec import MetricSpec

TEMPLATES = PromptTemplates()
QA = {"a": [("Is there a dog in the image? Please answer yes or no.", "Yes"),
            ("Is there a cat in the image? Please answer yes or no.", "No")],
      "b": [("Are there two cars? Please answer yes or no.", "Yes"),
            ("Are there three cars? Please answer yes or no.", "No")],
      "c": [("Is the sign red? Please answer yes or no.", "No"),
            ("Is the sign blue? Please answer yes or no.", "Yes")]}


def fake_mme(root: Path, split: bool) -> Path:
    """Two categories in MME's layout: ``images/`` + ``questions_answers_YN/`` (``split``) or
    each image beside its ``.txt``."""
    for category, stems in (("existence", ("a", "b")), ("color", ("c",))):
        folder = root / category
        image_dir = folder / "images" if split else folder
        qa_dir = folder / "questions_answers_YN" if split else folder
        image_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            Image.new("RGB", (8, 8)).save(image_dir / f"{stem}.{'png' if split else 'jpg'}")
            (qa_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in QA[stem]))
    return root


@pytest.mark.parametrize("split", [True, False])
def test_mme_loader_reads_both_layouts(tmp_path, split):
    probes = mme_probes(fake_mme(tmp_path, split), TEMPLATES)
    assert probes.name == "mme"
    assert [c.name for c in probes.categories] == ["color", "existence"]
    existence = probes.categories[1]
    assert [p.target for p in existence.prompts] == ["Yes", "No", "Yes", "No"]
    assert existence.prompts[0].text == TEMPLATES.m_loc.format(QA["a"][0][0])
    assert existence.prompts[2].image.path.stem == "b" and existence.prompts[2].image.path.is_file()
    assert existence.paired and len(set(existence.images)) == 2


def test_mme_accuracy_and_accuracy_plus_on_hand_built_answers(tmp_path):
    probes = mme_probes(fake_mme(tmp_path, True), TEMPLATES, categories=["existence", "color"])
    # existence: image a both right, image b one wrong -> acc 3/4, acc+ 1/2
    # color: image c one wrong -> acc 1/2, acc+ 0
    rows = score_categories(probes, [True, True, True, False, False, True])
    existence, color = rows
    assert existence["category"] == "existence" and existence["n_images"] == 2
    assert existence["accuracy"] == pytest.approx(75.0)
    assert existence["accuracy_plus"] == pytest.approx(50.0)
    assert existence["mme_score"] == pytest.approx(125.0)
    assert color["accuracy"] == pytest.approx(50.0) and color["accuracy_plus"] == 0.0


def test_mme_limit_keeps_whole_images(tmp_path):
    probes = mme_probes(fake_mme(tmp_path, False), TEMPLATES, ["existence"], limit=3)
    (existence,) = probes.categories
    assert len(existence.prompts) == 2 and set(existence.images) == {"a.jpg"}


def test_missing_mme_folder_and_empty_category_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="(?s)nowhere: MME folder not found.*probes_root"):
        mme_probes(tmp_path / "nowhere", TEMPLATES)
    root = fake_mme(tmp_path / "mme", True)
    (root / "eval_tool").mkdir()
    with pytest.raises(DataError, match="(?s)eval_tool: MME category has no question files.*probes_categories"):
        mme_probes(root, TEMPLATES)
    with pytest.raises(ConfigError, match="OCR.*available"):
        mme_probes(root, TEMPLATES, ["OCR"])


def test_probe_settings_are_checked(vqa_source):
    with pytest.raises(ConfigError, match="eval.probes='coco'"):
        MetricSpec(probes="coco")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="probes_root"):
        MetricSpec(probes="mme")
    with pytest.raises(ConfigError, match="probes_every"):
        MetricSpec(probes="miniworld", probes_every=-1)
    assert load_probe_set(MetricSpec(), vqa_source, TEMPLATES) is None
    with pytest.raises(ConfigError, match="data=mini_vqa"):
        load_probe_set(MetricSpec(probes="miniworld"), object(), TEMPLATES)
    mini = load_probe_set(MetricSpec(probes="miniworld", probes_limit=3), vqa_source, TEMPLATES)
    assert [c.name for c in mini.categories] == ["existence", "count", "position", "colour"]
    assert all(len(c.prompts) == 3 and not c.paired for c in mini.categories)
