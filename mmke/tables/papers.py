"""What the tables need to know about each paper beyond its column layout (which lives in
``mmke.evaluation.names.PAPER_COLUMNS``): where it claims significance, how its swept
hyperparameters ("settings") map to our config keys, the values its main tables use, and the
metric definitions its numbers follow.

``PaperSpec.settings`` (in ``PAPERS``) is THE mapping from a published ``setting`` name
(``lambda=0.001``) to the config keys of a run that hold it. The first key a run's config has
wins, so a setting keeps matching while the config spelling settles; a name not listed for a
paper is looked up as ``reg.<name>``, then ``editor.<name>``, then ``<name>`` (see
:func:`setting_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mmke.evaluation.names import PAPER_COLUMNS


@dataclass(frozen=True)
class PaperSpec:
    """One paper: its title, significance claims, settings and required metric definitions."""

    name: str
    title: str
    #: table -> alpha, for the tables whose caption claims significant improvements
    significance: Mapping[str, float] = field(default_factory=dict)
    #: setting name -> candidate config keys (dotted), first present wins
    settings: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: setting values of the paper's main configuration: a row that does not name one of these
    #: settings only matches runs at that value (runs without the key are not constrained)
    defaults: Mapping[str, str] = field(default_factory=dict)
    #: config values a run must have (where its config has the key) to stand beside the
    #: paper's numbers, e.g. the paper's locality definition
    requires: Mapping[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        """The paper's metric columns in printed order."""
        return PAPER_COLUMNS[self.name]


PAPERS: dict[str, PaperSpec] = {
    "odedit": PaperSpec(
        name="odedit",
        title="ODEdit: Generalizable Multimodal Large Language Model Editing via Invariant "
              "Trajectory Learning",
        # Table 1 caption: "All improvements are significant with p-value < 0.05 based on t-tests"
        # (five repetitions).
        significance={"table1": 0.05},
        settings={
            "lambda": ("reg.lam", "reg.tv_lambda", "reg.lambda_", "reg.lambda"),   # Figure 2
            "lr": ("reg.tv_lr", "reg.irm_lr", "reg.lr"),                           # Figure 4
            "depth": ("reg.tv_depth", "reg.tv_layers", "reg.depth"),               # Figure 4
            "variant": ("reg.variant",),                                           # Table 3
            "gen_align": ("reg.gen_align",),                                       # Table 4
            "kernel": ("reg.kernel",),                                             # Table 4
            "rephrases": ("reg.rephrases",),                                       # Table 4
        },
        # Section 5.1: adaptive TV penalty, a three-layer MLP, MMD with an RBF kernel and one
        # rephrase, all three risks.
        # (gen_align=mmd_s_rbf: conf/reg/odedit.yaml spells the Table 4 rows' names)
        defaults={"variant": "full", "gen_align": "mmd_s_rbf", "kernel": "rbf",
                  "rephrases": "single", "lambda": "adaptive", "depth": "3"},
        # computed with EasyEdit: top-k agreement over every position (mmke.evaluation.names)
        requires={"eval.locality": "topk", "eval.loc_positions": "easyedit"},
    ),
    "asam": PaperSpec(
        name="asam",
        title="ASAM: Beyond Binary Edits: Robust Multimodal Knowledge Editing with "
              "Adversarial Subspace Alignment",
        settings={
            "eps": ("reg.eps", "reg.epsilon"),                 # Table 6
            "n": ("reg.n_variants", "reg.n_adv", "reg.n"),
            "tau": ("reg.tau",),                               # Table 7 right
            "beta": ("reg.beta",),                             # Table 7 left
            "variants": ("reg.variants",),                     # Table 4
            "align": ("reg.align",),                           # Table 4
        },
        defaults={"eps": "1e-3", "n": "4", "tau": "4", "beta": "10",  # Table 5
                  "variants": "lar", "align": "rcsl"},
        # computed with EasyEdit: top-k agreement over every position (mmke.evaluation.names)
        requires={"eval.locality": "topk", "eval.loc_positions": "easyedit"},
    ),
    "more": PaperSpec(
        name="more",
        title="M-ORE: Modality-Decoupled Online Recursive Editing",
        settings={
            "rank": ("editor.rank", "editor.r", "editor.lora_rank"),            # Figure 11
            "lambda": ("editor.lam", "editor.lambda_", "editor.lambda"),        # Figure 12
            "variant": ("editor.variant",),                                     # Table 3
        },
        defaults={"variant": "full"},
        # M-ORE's locality is exp(-KL) (Eq. 17-18): `eval=more`.
        requires={"eval.locality": "kl", "eval.loc_positions": "first"},
    ),
}


#: How figures label a setting's axis.
SETTING_LABELS: dict[str, str] = {"lambda": "λ", "lr": "learning rate", "depth": "layer depth",
                                  "eps": "ε", "n": "n (variants)", "tau": "τ", "beta": "β",
                                  "rank": "rank r"}


def paper_spec(paper: str) -> PaperSpec:
    """The spec of ``paper`` (``odedit``, ``asam``, ``more``); KeyError names the known ones."""
    try:
        return PAPERS[paper]
    except KeyError:
        raise KeyError(f"unknown paper {paper!r}; known: {', '.join(PAPERS)}") from None


def setting_keys(paper: str, name: str) -> tuple[str, ...]:
    """Config keys that may hold setting ``name`` for ``paper``, in lookup order."""
    spec = PAPERS.get(paper)
    if spec is not None and name in spec.settings:
        return spec.settings[name]
    return (f"reg.{name}", f"editor.{name}", name)
