"""IKE: in-context knowledge editing, retrieved demonstrations in the prompt, no weight change.

Zheng et al., "Can We Edit Factual Knowledge by In-Context Learning?" (EMNLP 2023), §3, as
EasyEdit runs it on multimodal models:
- The demonstration bank: three sentences per TRAIN record (copy, update, retain;
  ``mmke.data.demonstrations``), embedded once with all-MiniLM-L6-v2 and cached on disk keyed by
  the encoder and the exact texts (``mmke.encoders.cached_encode``), so every run and sweep job
  of the same train split reads one file.
- An edit writes its new fact f = "{edit prompt} {new target}" into a memory, with its k
  demonstrations: the bank sentences most cosine-similar to EasyEdit's query sentence
  "New Fact: {f}\\nPrompt: {edit prompt}\\n\\n" (``mmke.encoders.nearest``; a bank row of the edited
  record itself is never picked). They are ordered least similar first, so the most similar
  stands next to the query (the IKE authors' ``icl_examples.reverse()``; EasyEdit's multimodal
  path keeps the opposite order), followed by the fact's own copy line, as EasyEdit appends it.
- Every prompt the evaluator scores or decodes passes through ``prepare_prompts``: it becomes
  "[demonstrations][copy lines]New Fact: {f}\\nPrompt: {prompt}", its image kept.

Streams (sequential and online protocols). The memory grows by one fact per edit (its text, its
k demonstrations, its embedding). A prompt's context holds its ``stream_facts`` facts most
similar to the prompt (MiniLM cosine between the prompt text and the facts; ties to the
earlier edit), the most similar last: the demonstrations of that fact, then the copy lines of
the others and its own, then the query on it. So a prompt's length stays bounded by k
demonstrations and ``stream_facts`` facts however long the stream, and each prompt pays one
cosine per fact of the memory. With one fact in the memory (the single protocol) no retrieval
is needed: every prompt reads that fact, locality prompts included, as in EasyEdit.
The retrieval reads the scored prompt itself, the input the edited model answers; nothing
scored enters the memory or the demonstrations.

``restore`` empties the memory: the model was never changed. IKE optimises nothing, so
``reg=odedit``/``reg=asam`` are refused. ``check_records`` stops a run before its first edit if
k demonstrations do not fit the backbone's context, naming the largest k that does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmke.backbones.base import Backbone
from mmke.data.demonstrations import IKEFormat, demonstration_bank, edit_fact
from mmke.data.prompts import PromptTemplates, edit_prompts
from mmke.data.record import EditRecord, Prompt
from mmke.editors.base import EditOutcome, Editor
from mmke.encoders import SentenceEncoder, cached_encode, nearest
from mmke.errors import ConfigError
from mmke.regularizers.base import Regularizer, TrainRecords


@dataclass(frozen=True)
class Fact:
    """One edit in the memory: its fact text, its demonstrations (least similar first, the
    fact's copy line last) and the fact's embedding (for picking facts in a stream)."""

    text: str
    demos: tuple[str, ...]
    embedding: torch.Tensor


def record_identity(record: EditRecord) -> tuple[str, ...]:
    """What makes two records the same edit (the image path and the texts)."""
    image = str(record.image.path) if record.image is not None else ""
    return (image, record.src, record.alt, record.rephrase, record.loc)


class IKE(Editor):
    """In-context editing. ``k``: demonstrations per edit (EasyEdit: 32 for BLIP-2 and
    MiniGPT-4); ``stream_facts``: facts of the stream in each prompt's context; ``line`` and
    ``separator``: the IKE text (``IKEFormat``); ``cache_dir``: where MiniLM is extracted and
    the bank's embeddings kept (``paths.cache_dir``); ``encoder_device``: where MiniLM runs."""

    accepts_regularizer = False

    def __init__(self, k: int = 32, stream_facts: int = 1,
                 line: str = IKEFormat.line, separator: str = IKEFormat.separator,
                 cache_dir: str | None = None, encoder_device: str = "auto",
                 encoder_batch_size: int = 64, progress: bool = True,
                 regularizer: Regularizer | None = None, name: str = "ike") -> None:
        super().__init__(regularizer, name)
        if k < 0:
            raise ConfigError(f"editor.k={k}: the number of demonstrations must be >= 0")
        if stream_facts < 1:
            raise ConfigError(f"editor.stream_facts={stream_facts} must be at least 1")
        if cache_dir is None:
            raise ConfigError("editor.cache_dir is needed for the sentence encoder and the "
                              "cached demonstration embeddings (conf/editor/ike.yaml sets it "
                              "to paths.cache_dir)")
        self.k = k
        self.stream_facts = stream_facts
        self.format = IKEFormat(line, separator)
        self.cache_dir = cache_dir
        self.encoder_device = encoder_device
        self.encoder_batch_size = encoder_batch_size
        self.progress = progress
        self.memory: list[Fact] = []
        self._train: TrainRecords | None = None
        self._encoder: SentenceEncoder | None = None
        self._bank: tuple[list[str], torch.Tensor, dict[tuple[str, ...], list[int]]] | None = None
        self._prompt_embeddings: dict[str, torch.Tensor] = {}
        self._retrieved: dict[tuple[tuple[str, ...], int], list[int]] = {}

    def attach(self, backbone: Backbone, templates: PromptTemplates,
               train_records: TrainRecords | None = None) -> None:
        if self.regularizer.active:
            raise ConfigError(
                f"editor=ike cannot take reg={type(self.regularizer).__name__.lower()}: IKE "
                "changes the prompt, not the weights, so there is no loss for the regularizer's "
                "terms to act on (the papers run IKE with reg=none). Use reg=none.")
        super().attach(backbone, templates, train_records)
        self._train = train_records
        self._bank = None
        self._retrieved.clear()
        self.memory.clear()

    # --- retrieval -------------------------------------------------------------------------------

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = SentenceEncoder(self.cache_dir, device=self.encoder_device,
                                            batch_size=self.encoder_batch_size,
                                            progress=self.progress)
        return self._encoder

    def bank(self) -> tuple[list[str], torch.Tensor, dict[tuple[str, ...], list[int]]]:
        """The demonstration texts of the train split, their embeddings (cached on disk), and
        the bank rows of each train record (to keep an edit of a train record off its own)."""
        if self._bank is None:
            if self._train is None:
                raise RuntimeError("IKE needs the train split: attach(..., train_records=...)")
            records = self._train()
            demos = demonstration_bank(records, self.templates, self.format)
            texts = [d.text for d in demos]
            rows: dict[tuple[str, ...], list[int]] = {}
            for row, d in enumerate(demos):
                rows.setdefault(record_identity(records[d.record]), []).append(row)
            self._bank = (texts, cached_encode(self.encoder, texts), rows)
        return self._bank

    def query_sentence(self, record: EditRecord) -> str:
        """EasyEdit's retrieval query for an edit: the fact, then its prompt."""
        fact = edit_fact(record, self.templates, self.format)
        return self.format.query(fact, self.templates.edit.format(record.src)) \
            + self.format.separator

    def retrieve(self, records: Sequence[EditRecord], k: int | None = None) -> list[list[int]]:
        """The bank rows of each record's k demonstrations, least similar first. Kept per record
        and k, so the run's check and its edits retrieve (and encode) each record once."""
        k = self.k if k is None else k
        if not records or k == 0:
            return [[] for _ in records]
        _, embeddings, rows = self.bank()
        missing = [r for r in records if (record_identity(r), k) not in self._retrieved]
        if missing:
            queries = self.encoder.encode([self.query_sentence(r) for r in missing])
            exclude = [rows.get(record_identity(r), []) for r in missing]
            found = nearest(queries, embeddings, k, exclude=exclude)
            for r, row in zip(missing, found.indices):
                self._retrieved[(record_identity(r), k)] = list(reversed(row.tolist()))
        return [self._retrieved[(record_identity(r), k)] for r in records]

    def demonstrations(self, records: Sequence[EditRecord], k: int | None = None) -> list[list[str]]:
        """The k demonstrations of each record's edit, least similar first."""
        texts = self.bank()[0]
        return [[texts[i] for i in row] for row in self.retrieve(records, k)]

    # --- editing ---------------------------------------------------------------------------------

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        facts = [edit_fact(r, self.templates, self.format) for r in records]
        copies = [self.format.demonstration(f, self.templates.edit.format(r.src), r.alt)
                  for f, r in zip(facts, records)]
        embeddings = self.encoder.encode(facts).detach().float().cpu()
        for fact, copy, demos, emb in zip(facts, copies, self.demonstrations(records), embeddings):
            self.memory.append(Fact(fact, (*demos, copy), emb))
        return EditOutcome(ok=True, steps=0, extra={"memory": float(len(self.memory))})

    def restore(self) -> None:
        self.memory.clear()

    def _chosen(self, prompts: Sequence[Prompt]) -> list[list[Fact]]:
        """Each prompt's facts, least similar first."""
        if len(self.memory) <= 1:
            return [list(self.memory) for _ in prompts]
        missing = sorted({p.text for p in prompts} - self._prompt_embeddings.keys())
        if missing:
            for text, emb in zip(missing, self.encoder.encode(missing).detach().float().cpu()):
                self._prompt_embeddings[text] = emb
        queries = torch.stack([self._prompt_embeddings[p.text] for p in prompts])
        bank = torch.stack([f.embedding for f in self.memory])
        found = nearest(queries, bank, min(self.stream_facts, len(self.memory)))
        return [[self.memory[i] for i in reversed(row.tolist())] for row in found.indices]

    def context(self, facts: Sequence[Fact], prompt_text: str) -> str:
        """The text a prompt becomes: the nearest fact's demonstrations, the other facts' copy
        lines, then the query on the nearest fact."""
        *others, top = facts
        lines = [*top.demos[:-1], *(f.demos[-1] for f in others), top.demos[-1]]
        return "".join(lines) + self.format.query(top.text, prompt_text)

    def prepare_prompts(self, prompts: Sequence[Prompt]) -> list[Prompt]:
        if not self.memory:
            return list(prompts)
        return [Prompt(self.context(facts, p.text), p.target, p.image, p.kind)
                for p, facts in zip(prompts, self._chosen(prompts))]

    # --- the context limit -----------------------------------------------------------------------

    def check_records(self, records: Sequence[EditRecord]) -> None:
        """Stop before the first edit if a prompt of ``records`` with k demonstrations (and, in a
        stream, ``stream_facts`` facts) would not fit the backbone's context; the message names
        the largest k that fits every record."""
        assert self.backbone is not None
        limit = self.backbone.context_length
        demos = self.demonstrations(records)
        copies = [self.format.demonstration(edit_fact(r, self.templates, self.format),
                                            self.templates.edit.format(r.src), r.alt)
                  for r in records]
        extra = "".join(sorted(copies, key=len)[-(self.stream_facts - 1):]) \
            if self.stream_facts > 1 and len(records) > 1 else ""

        def longest(record: EditRecord, kept: list[str], copy: str) -> int:
            fact = edit_fact(record, self.templates, self.format)
            head = "".join(kept) + extra + copy
            return max(len(self.backbone.encode(Prompt(head + self.format.query(fact, p.text),
                                                       p.target, p.image, p.kind)).input_ids)
                       for p in edit_prompts(record, self.templates))

        fits = self.k
        worst = 0
        for record, kept, copy in zip(records, demos, copies):
            length = longest(record, kept, copy)
            worst = max(worst, length)
            while fits > 0 and longest(record, kept[len(kept) - fits:], copy) > limit:
                fits -= 1
        if worst > limit:
            head = longest(records[0], [], copies[0]) if records else 0
            raise ConfigError(
                f"editor.k={self.k}: IKE prompts of this run reach {worst} positions, more than "
                f"the {limit} of backbone {getattr(self.backbone, 'name', '')!r}. "
                + (f"The largest k that fits every record is {fits}; set editor.k={fits}."
                   if head <= limit else
                   "Even without demonstrations a prompt does not fit; lower "
                   "editor.stream_facts or use a backbone with a longer context."))

