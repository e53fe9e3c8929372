"""Neurons appended to the FFN of one language layer, as a pair of hooks (T-Patcher, UniKE).

Huang et al., "Transformer-Patcher: One Mistake Worth One Neuron" (ICLR 2023), §3 (the patched
FFN; equation numbers are not cited because the paper's text could not be checked here): the FFN
is FFN(h) = act(h·K + b_k)·V + b_v. Appending neurons with keys k_p, biases b_p and values v_p
gives
  FFN_p(h) = [act(h·K + b_k), act(h·k_p + b_p)]·[V; v_p] + b_v = FFN(h) + act(h·k_p + b_p)·v_p:
the new rows never mix with the old ones. So this module leaves every weight as it is
and adds act(h·k_p + b_p)·v_p to the FFN's output instead. A forward pre-hook on the FFN's input
matrix (role ``ffn_in``: OPT ``fc1``, Llama ``up_proj``) reads h, the FFN's input after its layer
norm. A forward hook on its output matrix (role ``ffn_out``: OPT ``fc2``, Llama ``down_proj``)
adds the neurons' sum to that matrix's output, which is the FFN's output. On OPT (ReLU FFN)
with ``activation="relu"`` this is exactly appending neurons to ``fc1``/``fc2``
(tests/editors/test_tpatcher.py checks it against resized matrices). A Llama-style gated FFN has no
plain neuron of that form: there the patch is the paper's neuron act(h·k + b)·v beside the gated
ones.

The patch acts at every position, as a neuron of the FFN does; each row of the input is one
position (OPT flattens [batch, seq] before its FFN; nothing here needs the layout).

UniKE (Pan et al., NeurIPS 2024) reuses this for its intrinsic-knowledge neurons: one
``NeuronPatch`` per edited layer, blocks added per edit, older blocks frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmke.backbones.base import Backbone, ModelBatch
from mmke.regularizers.base import EditContext, EditRequest, Regularizer, RegularizerStep

#: the neuron's activation function act(·) of the patched FFN. ``relu`` (OPT's own FFN activation): a
#: neuron with h·k + b <= 0 contributes exactly nothing, which is what "inactive" means for the
#: memory loss. ``gelu`` (BART's, the paper's backbone) leaks a little below zero.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class NeuronBlock:
    """The neurons one edit adds: keys [n, d_in], biases [n], values [n, d_out], float32."""

    keys: nn.Parameter
    biases: nn.Parameter
    values: nn.Parameter

    def named_parameters(self, prefix: str = "") -> dict[str, nn.Parameter]:
        return {f"{prefix}keys": self.keys, f"{prefix}biases": self.biases,
                f"{prefix}values": self.values}

    def __len__(self) -> int:
        return self.keys.shape[0]


class NeuronPatch:
    """Neurons added beside the FFN of one layer (``ffn_in`` and ``ffn_out`` of that layer).

    Blocks accumulate (``add``); the hooks are registered with the first block and removed by
    ``remove``, which also drops every block. ``truncate`` drops the blocks after a given count
    (undo a failed edit). The backbone's parameters are never touched.
    """

    def __init__(self, ffn_in: nn.Module, ffn_out: nn.Module, activation: str = "relu") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
        self.ffn_in, self.ffn_out = ffn_in, ffn_out
        self.act = ACTIVATIONS[activation]
        self.blocks: list[NeuronBlock] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._h: torch.Tensor | None = None

    @property
    def n_neurons(self) -> int:
        return sum(len(b) for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def add(self, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor) -> NeuronBlock:
        """Append ``len(keys)`` neurons (trainable float32 copies of the given tensors); the
        hooks go on with the first block."""
        if keys.dim() != 2 or values.dim() != 2 or biases.shape != keys.shape[:1] \
                or values.shape[0] != keys.shape[0]:
            raise ValueError("keys [n, d_in], biases [n] and values [n, d_out] must agree on n")
        block = NeuronBlock(*(nn.Parameter(t.detach().float().clone())
                              for t in (keys, biases, values)))
        self.blocks.append(block)
        if not self._handles:
            self._handles = [self.ffn_in.register_forward_pre_hook(self._read),
                             self.ffn_out.register_forward_hook(self._write)]
        return block

    def freeze(self) -> None:
        """Stop every neuron from training (a stream trains only the newest block)."""
        for p in self.parameters():
            p.requires_grad_(False)

    def parameters(self) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            yield from block.named_parameters().values()

    def pre_activations(self, h: torch.Tensor,
                        blocks: Sequence[NeuronBlock] | None = None) -> torch.Tensor:
        """h·k + b of each neuron of ``blocks`` (default: all), [..., n], in float32 and
        differentiable in the neurons."""
        blocks = self.blocks if blocks is None else blocks
        keys = torch.cat([b.keys for b in blocks]).to(h.device)
        biases = torch.cat([b.biases for b in blocks]).to(h.device)
        return h.float() @ keys.T + biases

    def contribution(self, h: torch.Tensor) -> torch.Tensor:
        """act(h·k + b)·v summed over every neuron (the patched FFN's added term), float32 [..., d_out]."""
        values = torch.cat([b.values for b in self.blocks]).to(h.device)
        return self.act(self.pre_activations(h)) @ values

    def truncate(self, n_blocks: int) -> None:
        """Keep the first ``n_blocks`` blocks; remove the hooks when none is left."""
        del self.blocks[n_blocks:]
        if not self.blocks:
            self.remove()

    def remove(self) -> None:
        """Remove the hooks and every neuron: the model computes as if never patched."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.blocks = []
        self._h = None

    def _read(self, module: nn.Module, args: tuple) -> None:
        self._h = args[0]

    def _write(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        h, self._h = self._h, None
        if h is None:
            raise RuntimeError("the patched FFN's output matrix ran without its input matrix")
        return output + self.contribution(h).to(output.dtype)


def ffn_inputs_at(backbone: Backbone, batch: ModelBatch,
                  layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The FFN inputs h of each language layer of ``layers`` (absolute or negative), [batch,
    seq, d] each, detached, keyed by absolute index, from one forward of ``batch`` with the model
    as it is (patches already added included)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        index = backbone.modules.resolve_layer(layer)

        def capture(_module: nn.Module, args: tuple, index: int = index) -> None:
            captured[index] = args[0].detach()

        handles.append(backbone.modules.ffn_in(index).register_forward_pre_hook(capture))
    try:
        with torch.no_grad():
            backbone.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {i: h.reshape(*batch.input_ids.shape, h.shape[-1]) for i, h in captured.items()}


def ffn_inputs(backbone: Backbone, batch: ModelBatch, layer: int) -> torch.Tensor:
    """The FFN input h of language layer ``layer`` (the input of its ``ffn_in``, after the
    layer norm) at every position, [batch, seq, d], detached, from one forward of ``batch``.
    These are the queries q of T-Patcher's neurons at that layer."""
    return ffn_inputs_at(backbone, batch, [layer])[backbone.modules.resolve_layer(layer)]


def top_k_exp_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """S(x) of the memory loss: the mean of exp over the k largest entries of ``x``."""
    flat = x.reshape(-1)
    return torch.exp(flat.topk(min(k, flat.numel())).values).mean()


@dataclass(frozen=True)
class PatchMargins:
    """T-Patcher's activation and memory losses' settings: the margins α (``act``), β
    (``memory``), γ (``gap``) and the k of S (``topk``)."""

    act: float = 0.0
    memory: float = -3.0
    gap: float = 3.0
    topk: int = 1000


def patch_losses(patch: NeuronPatch, block: NeuronBlock, q_e: torch.Tensor,
                 memory: torch.Tensor | None, margins: PatchMargins) -> dict[str, torch.Tensor]:
    """T-Patcher's l_a and l_m1 + l_m2 for the neurons of ``block`` (neuron i keys on edit
    query ``q_e[i]``): ``act`` = mean_i exp(α − a_e,i) with a_e,i = q_e,i·k_i + b_i (the neuron
    fires on its edit query); ``memory`` = S(Q_M·k + b − β) + S(Q_M·k + b − a_e + γ) (silent on
    the memory queries Q_M, and below the edit's own activation by γ); zero without a memory.
    T-Patcher and UniKE train their neurons with these."""
    a_e = patch.pre_activations(q_e, [block]).diagonal()
    terms = {"act": torch.exp(margins.act - a_e).mean()}
    if memory is None:
        terms["memory"] = a_e.new_zeros(())
        return terms
    a_m = patch.pre_activations(memory, [block])                      # [N, n]
    terms["memory"] = (top_k_exp_mean(a_m - margins.memory, margins.topk)
                       + top_k_exp_mean(a_m - a_e + margins.gap, margins.topk))
    return terms


def train_neurons(backbone: Backbone, batch: ModelBatch, request: EditRequest,
                  layers: Sequence[int], params: dict[str, nn.Parameter], regularizer: Regularizer,
                  patch_loss: Callable[[], torch.Tensor], steps: int, lr: float,
                  weight_decay: float, early_stop_loss: float | None, outcome: object) -> bool:
    """One edit's training of new neurons (T-Patcher, UniKE): Adam on ``params`` for ``steps``
    steps on the edit's NLL + ``patch_loss()`` (the activation and memory losses) + the
    regularizer's term, through the regularizer seam (``begin``/``loss``/``after_step``/``end``).
    Stops early once the NLL is below ``early_stop_loss``. Counts steps and the last loss on
    ``outcome`` (an ``EditOutcome``); False on a non-finite loss (the caller undoes the edit)."""
    optimizer = torch.optim.Adam(params.values(), lr=lr, weight_decay=weight_decay)
    try:
        regularizer.begin([request], EditContext(list(layers), params, batch))
        for step in range(steps):
            out = backbone.forward(batch, output_hidden_states=regularizer.needs_hidden_states)
            task_loss = backbone.nll(batch, out)
            loss = (task_loss + patch_loss()
                    + regularizer.loss(RegularizerStep(step, batch, out, task_loss)))
            outcome.final_loss = loss.item()  # type: ignore[attr-defined]
            if not math.isfinite(outcome.final_loss):  # type: ignore[attr-defined]
                return False
            if early_stop_loss is not None and task_loss.item() < early_stop_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            regularizer.after_step()
            outcome.steps += 1  # type: ignore[attr-defined]
    finally:
        regularizer.end()
    return True
