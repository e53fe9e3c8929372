"""ASAM (Wang et al., §4, App. A.4) as a plug-in regularizer for any loss-based editor.

In ``begin`` (the model before this edit): LAR (Eq. 4-5) builds n perturbations δ_1..δ_n of the
joint input embeddings z = [e_v; e_t] = ``Backbone.embed(batch)`` of the edit prompt(s), in
float32, by one projected ascent step on the edit NLL from a random start in the ε-ball (all n
copies in one batched forward). At each step: z is re-embedded (so an editor of the vision side
still gets gradients through the variants), z_1..z_n = z + δ_i go through one batched forward,
h_i is the output of the edit layer at the last prompt token (the position that predicts the
answer), h_0 the same state of the editor's own forward (detached, Eq. 11), and
L_align (Eq. 10, or Table 4's cosine/ℓ2) is returned times β (Eq. 12). L_rel and L_loc of Eq. 12
are the base editor's own losses (FT has a reliability loss only).

Choices: δ is drawn once per edit, not per step (the paper generates the variants of "an edit
request"; per-step regeneration would double the extra forwards). Edit layer: the deepest layer
the editor modifies (the feature extractor is "the edit layer L and the early layers", so every
edited layer is inside it); an editor of vision-side modules only (FT-M) has no language edit
layer, and the last layer's output is used.

No leaky setting, unlike ODEdit: ASAM's text gives no reading in which the regularizer uses the
evaluated record's rephrase or locality prompts. Its variants are "generated" in the latent
space "without relying on external supervision" (§4.1); App. A.2 lists the benchmark's
"semantically rephrased variants to evaluate the effect of ASAM" (scored, not trained on) and
"out-of-scope samples to ensure locality preservation", which Eq. 12 leaves to the base
editor ("Reliability and locality losses L_rel and L_loc follow standard knowledge editing
formulations"), not to ASAM's β·L_align. Table 4's SimCSE row "retriev[es] semantically similar
rephrases using sentence embedding similarity", a search over a corpus (here the train split),
not the record's own rephrase. So every edit request reaches ASAM without revealed prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmke.encoders import SentenceEncoder
from mmke.errors import ConfigError, check_choice
from mmke.regularizers.base import EditContext, EditRequest, Regularizer, RegularizerStep
from mmke.regularizers.hidden import last_prompt_positions, states_at, tile_rows
from mmke.regularizers.lar import LAR_NORMS, lar_variants
from mmke.regularizers.rcsl import ALIGNS, alignment_loss, pool_hidden
from mmke.regularizers.retrieved import RetrievedParaphrases

VARIANT_SOURCES = ("lar", "original", "simcse")


class ASAM(Regularizer):
    """Settings (``conf/reg/asam.yaml``): eps, n_variants, tau, beta (Table 5: 1e-3, 4, 4, 10);
    variants: lar | original (no variants: L_align = 0) | simcse (train-split phrasings retrieved
    by sentence similarity, ``retrieved.py``); align: rcsl | cosine | l2 (Table 4); norm: the LAR
    ball (``lar.LAR_NORMS``); pooling: last (last prompt token) | mean; seed: LAR's random starts;
    cache_dir: where simcse's encoder and train embeddings are cached (``paths.cache_dir``)."""

    needs_hidden_states = True

    def __init__(self, eps: float = 1e-3, n_variants: int = 4, tau: float = 4.0,
                 beta: float = 10.0, variants: str = "lar", align: str = "rcsl",
                 norm: str = "l2_sequence", pooling: str = "last", seed: int = 0,
                 cache_dir: str | None = None, name: str = "asam") -> None:
        super().__init__(name)
        check_choice("reg.variants", variants, VARIANT_SOURCES)
        if variants == "simcse" and cache_dir is None:
            raise ConfigError("reg.variants=simcse needs reg.cache_dir (conf/reg/asam.yaml sets "
                              "it to paths.cache_dir) for its encoder and embeddings")
        # simcse retrieves from the train split; the other variants need no data
        self.needs_train_records = variants == "simcse"
        self.cache_dir = cache_dir
        self.paraphrases: RetrievedParaphrases | None = None
        for setting, value, allowed in (("reg.align", align, ALIGNS), ("reg.norm", norm, LAR_NORMS),
                                        ("reg.pooling", pooling, ("last", "mean"))):
            check_choice(setting, value, allowed)
        if not eps > 0 or n_variants < 1 or not tau > 0 or beta < 0:
            raise ConfigError("reg.eps > 0, reg.n_variants >= 1, reg.tau > 0, reg.beta >= 0")
        self.eps, self.n, self.tau, self.beta = float(eps), int(n_variants), float(tau), float(beta)
        self.variants, self.align, self.norm, self.pooling = variants, align, norm, pooling
        self.seed = seed
        self._edit: dict | None = None
        self.retrieved: list[list[str]] = []  # simcse: the last edit's phrasings, per request
        self.last_terms: dict[str, float] = {}

    def attach(self, backbone, templates, train_records=None) -> None:
        super().attach(backbone, templates, train_records)
        if self.variants == "simcse":
            assert self.cache_dir is not None
            encoder = SentenceEncoder(self.cache_dir, device=None, progress=False)
            self.paraphrases = RetrievedParaphrases(self.train_records, templates, encoder)

    def begin(self, requests: Sequence[EditRequest], context: EditContext) -> None:
        backbone = self.backbone
        assert backbone is not None and context.batch is not None
        batch = context.batch
        n_layers = backbone.modules.num_language_layers
        layer = max(context.edit_layers) if context.edit_layers else n_layers - 1
        edit = {"batch": batch, "layer": layer, "delta": None}
        if self.variants == "lar":
            tiled = tile_rows(batch, self.n)
            key = f"{self.seed}\x00" + "\x01".join(r.uid + r.prompt.text for r in requests)
            gen = torch.Generator().manual_seed(_crc(key))

            def edit_loss(zs: torch.Tensor) -> torch.Tensor:  # (n, B, T, d) -> Σ per-copy NLL
                embeds = zs.reshape(-1, *zs.shape[2:]).to(backbone.dtype)
                out = backbone.forward(tiled, inputs_embeds=embeds)
                return backbone.nll(tiled, out, reduction="none").sum()

            with torch.no_grad():
                z = backbone.embed(batch).float()
            mask = batch.attention_mask.bool()
            variants = lar_variants(z, edit_loss, self.n, self.eps, self.norm,  # type: ignore[arg-type]
                                    generator=gen, mask=mask)
            edit["delta"] = (variants - z.unsqueeze(0)).detach()  # (n, B, T, d), float32
            edit["tiled"] = tiled
        elif self.variants == "simcse":
            assert self.paraphrases is not None
            found = [self.paraphrases.variants(r, self.n) for r in requests]
            edit["retrieved"] = backbone.prepare([p for ps in found for p in ps])
            edit["counts"] = [len(ps) for ps in found]
            self.retrieved = [[p.text for p in ps] for ps in found]  # for inspection and tests
        self._edit = edit

    def _pool(self, hidden: torch.Tensor, batch) -> torch.Tensor:
        if self.pooling == "last":
            return states_at(hidden, last_prompt_positions(batch))
        return pool_hidden(hidden, batch.attention_mask, "mean")

    def loss(self, step: RegularizerStep) -> torch.Tensor:
        edit, backbone = self._edit, self.backbone
        assert edit is not None and backbone is not None
        if edit["delta"] is None and "retrieved" not in edit:  # original: nothing to align
            return step.task_loss.new_zeros(())
        assert step.output.hidden_states is not None
        batch, layer, delta = edit["batch"], edit["layer"], edit["delta"]
        h0 = self._pool(step.output.hidden_states[layer + 1], batch)  # (B, d)
        if delta is None:  # simcse: the retrieved phrasings, each with its own length
            retrieved = edit["retrieved"]
            out = backbone.forward(retrieved, output_hidden_states=True)
            hv_all = self._pool(out.hidden_states[layer + 1], retrieved)
            groups = hv_all.split(edit["counts"])
            align = torch.stack([alignment_loss(h0[b], groups[b], self.align, self.tau)
                                 for b in range(len(batch))]).mean()
            self.last_terms = {"align": float(align.detach())}
            return self.beta * align
        z = backbone.embed(batch).float()
        zs = (z.unsqueeze(0) + delta).reshape(-1, *z.shape[1:]).to(backbone.dtype)
        tiled = edit["tiled"]
        out = backbone.forward(tiled, inputs_embeds=zs, output_hidden_states=True)
        hv = self._pool(out.hidden_states[layer + 1], tiled).reshape(self.n, len(batch), -1)
        align = torch.stack([alignment_loss(h0[b], hv[:, b], self.align, self.tau)
                             for b in range(len(batch))]).mean()
        self.last_terms = {"align": float(align.detach())}
        return self.beta * align

    def end(self) -> None:
        self._edit = None

    def summary(self) -> dict[str, float | str]:
        return {"variants": {"lar": "generated (LAR)", "original": "original",
                             "simcse": "retrieved from train (all-MiniLM-L6-v2)"}[self.variants]}


def _crc(text: str) -> int:
    import zlib
    return zlib.crc32(text.encode())
