"""ODEdit's Edit Trajectory Invariant Learning (Su et al., §4.3, Eq. 9-13, App. A.3).

Environments are IRMv1 dummy classifiers: a scalar ω multiplying the logits, ω ∘ φ_e
(Arjovsky et al., 2019; ODEdit §3). The risk is then a function R_edit(ω) of ω alone and

    G(δ, φ_e) = E_ω[R_edit(ω ∘ φ_e)] + λ(δ, φ_e) · (E_ω[|∇_ω R_edit(ω ∘ φ_e)|])²      (Eq. 11)

The penalty is the TV-ℓ1 one that ODEdit writes (Eq. 9-12): the *absolute* ω-gradient averaged
over ω, then squared; IRMv1's penalty is instead the mean *squared* gradient, E_ω[(∇_ω R)²]
(``irmv1_penalty``, for comparison). The editor descends G in φ_e; the λ network's parameters δ
ascend it (Eq. 12-13). λ(δ, φ_e) reads the edited parameters, as in the adaptive-λ IRM-TV that
ODEdit builds on (Wang, Lai & Zhong, ICLR 2025, code laizhr/OOD-TV-IRM, whose λ MLP takes the
flattened, non-detached trainable parameters): here through a fixed-size sketch of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mmke.tensor_state import load_optimizer_tensors, optimizer_tensors

RiskOfOmega = Callable[[torch.Tensor], torch.Tensor]


def scale_logits(logits: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """ω ∘ φ_e: the IRMv1 dummy classifier, a scalar ω multiplying the logits (ODEdit §3, §4.3)."""
    return logits * omega


def omega_samples(n: int = 1, spread: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The ω at which E_ω is evaluated (App. A.3: "approximated using Monte Carlo sampling").

    ODEdit does not say how ω is distributed. Default: the single dummy ω = 1 of IRMv1 and of the
    OOD-TV-IRM code (one point, no sampling). With ``spread`` > 0: n draws of U[1 − spread,
    1 + spread], a neighbourhood of the identity classifier.
    """
    if n < 1 or spread < 0:
        raise ValueError("omega_samples needs n >= 1 and spread >= 0")
    if n == 1 and spread == 0.0:
        return torch.ones(1)
    u = torch.rand(n, generator=generator)
    return 1.0 + spread * (2.0 * u - 1.0)


def _omega_grads(risk_fn: RiskOfOmega, omegas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R(ω_k), ∂R/∂ω at ω_k) for every k, the gradient kept in the graph (create_graph=True)
    so the penalty can be back-propagated to φ_e (a double backward, as in IRMv1)."""
    # float32 at least; a float64 ω keeps the gradient in float64 (finite-difference checks)
    w = omegas.detach().to(torch.promote_types(omegas.dtype, torch.float32)).clone().requires_grad_(True)
    risks = torch.stack([risk_fn(w[k]).reshape(()) for k in range(w.shape[0])])
    # R(ω_k) depends on w[k] only, so the gradient of the sum is the vector of ∂R(ω_k)/∂ω_k.
    (grads,) = torch.autograd.grad(risks.sum(), w, create_graph=True)
    return risks, grads


def tv_l1_penalty(risk_fn: RiskOfOmega, omegas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9/11: returns (E_ω[R_edit(ω ∘ φ_e)], (E_ω[|∇_ω R_edit(ω ∘ φ_e)|])²).

    ``risk_fn(ω)`` -> scalar R_edit at a scalar ω (e.g. NLL and KL of ``scale_logits(logits, ω)``;
    risks that do not read the logits, like R_gen, have zero ω-gradient and add nothing here).
    |·|'s subgradient at 0 is 0, as App. A.3 prescribes.
    """
    risks, grads = _omega_grads(risk_fn, omegas)
    return risks.mean(), grads.abs().mean().pow(2)


def irmv1_penalty(risk_fn: RiskOfOmega, omegas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IRMv1 (ODEdit §3, Arjovsky et al.): (E_ω[R], E_ω[(∇_ω R)²]); not ODEdit's penalty, kept
    to contrast with the TV-ℓ1 form."""
    risks, grads = _omega_grads(risk_fn, omegas)
    return risks.mean(), grads.pow(2).mean()


def tv_objective(risk: torch.Tensor, penalty: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """Eq. 11: G = E_ω[R_edit] + λ · penalty."""
    return risk + lam * penalty


class ParameterSketch:
    """A fixed-size, seeded, linear reduction of the trainable parameters φ_e: the λ network's input.

    The OOD-TV-IRM code feeds the whole flattened parameter vector to λ's first Linear; for an
    edited 7B layer (tens of millions of weights) that first Linear alone would be larger than the
    layer. We use a CountSketch with a structured hash instead: element i of a tensor goes to bucket
    i mod r with a seeded random sign, i.e. y = Σ_t s_tᵀ · reshape(φ_t, (−1, r)) / sqrt(N / r).

    Why this one: it is linear and non-detached, so ∇_φe λ exists (App. A.3's ∇_φe λ · penalty term)
    and it approximately preserves norms and inner products (E‖y‖² = ‖φ‖²·r/N); it costs one GEMV per
    tensor, reads the parameters in place (a view, no copy, no P-sized temporary), and stores only
    N/r signs. Per-tensor statistics (mean/std/norm) would make λ almost blind to the edit; a dense
    Gaussian projection would need r·N random numbers. The 1/sqrt(N/r) keeps entries at the scale
    of one parameter whatever the layer size. Output is float32.
    """

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError("sketch dim must be >= 1")
        self.dim, self.seed = dim, seed
        self._signs: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _signs_for(self, index: int, numel: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, numel, str(like.device))
        if key not in self._signs:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            rows, tail = divmod(numel, self.dim)
            signs = torch.randint(0, 2, (rows + tail,), generator=gen).float() * 2.0 - 1.0
            self._signs[key] = (signs[:rows].to(like.device), signs[rows:].to(like.device))
        main, tail = self._signs[key]
        return main.to(like.dtype), tail.to(like.dtype)

    def __call__(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        if not params:
            raise ValueError("ParameterSketch needs at least one parameter tensor")
        total = sum(p.numel() for p in params)
        out = torch.zeros(self.dim, dtype=torch.float32, device=params[0].device)
        for index, p in enumerate(params):
            flat = p.reshape(-1)
            rows = flat.numel() // self.dim
            main_signs, tail_signs = self._signs_for(index, flat.numel(), flat)
            if rows:
                out = out + (main_signs @ flat[: rows * self.dim].view(rows, self.dim)).float()
            tail = flat[rows * self.dim:]
            if tail.numel():
                out = out + F.pad((tail * tail_signs).float(), (0, self.dim - tail.numel()))
        return out / math.sqrt(max(total / self.dim, 1.0))


class LambdaNet(nn.Module):
    """λ(δ, ·): an MLP of ``depth`` Linear layers (width ``width``), ReLU between them, Softplus on
    the output, Xavier-uniform weights and zero biases (ODEdit §5.1: "a three-layer MLP with ReLU
    activations ..., Xavier initialization ..., and Softplus activation at the output").

    λ > 0 always: inputs are made finite and clipped to ±``input_clip`` (a sane parameter sketch is
    far inside), and ``min_lambda`` is added because Softplus underflows to exactly 0 in float32
    for pre-activations below about −100.
    """

    def __init__(self, in_dim: int, width: int = 64, depth: int = 3, min_lambda: float = 1e-8,
                 input_clip: float = 1e4, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_dim < 1:
            raise ValueError("LambdaNet needs depth >= 1, width >= 1, in_dim >= 1")
        if min_lambda <= 0:
            raise ValueError("min_lambda must be > 0 so that λ > 0")
        dims = [in_dim] + [width] * (depth - 1) + [1]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            # skip_init: no draw from the global RNG for nn.Linear's default init we overwrite anyway
            linear = nn.utils.skip_init(nn.Linear, d_in, d_out)
            nn.init.xavier_uniform_(linear.weight, generator=generator)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        self.min_lambda, self.input_clip = min_lambda, input_clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (in_dim,) or (B, in_dim) -> scalar λ (mean over a batch, as OOD-TV-IRM)."""
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=self.input_clip, neginf=-self.input_clip)
        x = x.clamp(-self.input_clip, self.input_clip)
        return (F.softplus(self.body(x)) + self.min_lambda).mean()


class AdaptiveLambda:
    """λ(δ, φ_e) and its dual ascent (Eq. 12-13) with its own Adam at lr ``tv_lr``.

    Eq. 13 alternates φ^(k+1) = φ^(k) − γ1 ∂_φ G(δ^(k), φ^(k)) and
    δ^(k+1) = δ^(k) + γ2 ∇_δ G(δ^(k), φ^(k+1)). Use: at step k, ``lam(params)`` gives λ with δ
    frozen and gradients to φ (the ∇_φ λ · penalty term of App. A.3) for the editor's descent on
    ``tv_objective``; after the editor's optimiser step, ``dual_step(params, penalty)`` ascends δ.
    ∇_δ G = ∇_δ λ · penalty (App. A.3) needs the penalty at φ^(k+1); to avoid a second forward and
    double backward per step, pass the penalty just computed at φ^(k) (λ itself is re-read at
    φ^(k+1)), or call ``dual_step`` at the start of step k+1 with that step's penalty, which is
    Eq. 13 exactly (shifted by half a step).
    """

    def __init__(self, sketch_dim: int = 256, width: int = 64, depth: int = 3, lr: float = 1e-3,
                 seed: int = 0, device: torch.device | str | None = None) -> None:
        # Xavier init from a private generator: same seed, same λ network; the global RNG untouched.
        init_gen = torch.Generator().manual_seed(seed)
        self.net = LambdaNet(sketch_dim, width, depth, generator=init_gen).to(device)
        self.sketch = ParameterSketch(sketch_dim, seed)
        # maximize=True: Adam ascends G in δ (Eq. 12's max over δ).
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, maximize=True)

    def _frozen_net(self, x: torch.Tensor) -> torch.Tensor:
        frozen = {name: p.detach() for name, p in self.net.named_parameters()}
        return functional_call(self.net, frozen, (x,))

    def lam(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """λ(δ^(k), φ_e) for the primal step: differentiable in φ_e, constant in δ."""
        return self._frozen_net(self.sketch(params))

    def dual_step(self, params: Sequence[torch.Tensor], penalty: torch.Tensor) -> torch.Tensor:
        """One ascent step of δ on G (only λ·penalty depends on δ; φ_e and the penalty are
        constants here). Returns λ before the step (detached)."""
        x = self.sketch([p.detach() for p in params])
        lam = self.net(x)
        objective = lam * penalty.detach().float()
        net_params = list(self.net.parameters())
        grads = torch.autograd.grad(objective, net_params)
        for p, g in zip(net_params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lam.detach()

    def state(self) -> dict[str, torch.Tensor]:
        """δ (``net.*``) and its Adam state (``opt.*``, the step counter included)."""
        out = {f"net.{k}": v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        out.update({f"opt.{k}": v for k, v in optimizer_tensors(self.optimizer).items()})
        return out

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put back what ``state`` returned (the optimiser's settings are this one's)."""
        self.net.load_state_dict({k[len("net."):]: v for k, v in state.items()
                                  if k.startswith("net.")})
        load_optimizer_tensors(self.optimizer, {k[len("opt."):]: v for k, v in state.items()
                                                if k.startswith("opt.")})


class FixedLambda:
    """A constant λ (ODEdit Figure 2's fixed-penalty ablation, e.g. 1e-4 or 1e-2): no dual step."""

    def __init__(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"a fixed tv_lambda must be >= 0, got {value}")
        self.value = float(value)

    def lam(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        device = params[0].device if params else None
        return torch.tensor(self.value, device=device)

    def dual_step(self, params: Sequence[torch.Tensor], penalty: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.value, device=penalty.device)


def make_lambda(tv_lambda: float | str, *, sketch_dim: int = 256, width: int = 64, depth: int = 3,
                lr: float = 1e-3, seed: int = 0,
                device: torch.device | str | None = None) -> AdaptiveLambda | FixedLambda:
    """``tv_lambda``: "adaptive" for the λ network, or a number for a fixed λ."""
    if isinstance(tv_lambda, str):
        if tv_lambda.strip().lower() == "adaptive":
            return AdaptiveLambda(sketch_dim, width, depth, lr, seed, device)
        tv_lambda = float(tv_lambda)
    return FixedLambda(float(tv_lambda))
