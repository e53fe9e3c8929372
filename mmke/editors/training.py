"""Trained editors (MEND, SERAC, LiveEdit): their networks are fitted once on the train split and
cached, and every later run, sweep job or table config loads them.

A ``TrainedEditor`` supplies ``build_networks`` (fresh, seeded networks, built after ``attach``
so they know the backbone's shapes), ``training_loss`` (the method's own objective on a batch of
train records) and ``cache_settings`` (every setting that changes what training yields). ``fit``
does the rest, once for all of them:

- the cache folder ``<cache_dir>/trained/<name>/<key>/`` is keyed by the backbone's weights, the
  train records (their text fields and image paths, in order), the class, its ``code_version``,
  ``cache_settings()``, the regularizer's settings and the ``TrainingSettings``;
- ``final.safetensors`` holds the trained networks; while training, ``checkpoint.safetensors``
  holds networks, Adam state, the step and the torch RNG every ``checkpoint_every`` steps, so a
  killed fit resumes where its last checkpoint left it and ends with the same networks;
- batches are a deterministic function of (seed, step), so a resumed or a repeated fit sees the
  same records in the same order;
- under ``accelerate launch`` (a torch.distributed process group) each process takes its share of
  every batch and the gradients are averaged (data parallel); the main process writes the files.
  ``self.share`` (a ``BatchShare``) tells ``training_loss`` where its records sit in the step's
  batch, so a method whose objective couples the batch's records (LiveEdit's routing losses,
  MEND's running statistics, SERAC's classifier pairs) can gather what it needs from the other
  processes and weigh its means so that the averaged gradients are the one-process gradients;
- the regularizer's training state (``Regularizer.training_state``: ODEdit's λ network and its
  Adam moments, which MEND's meta-loss trains) is checkpointed with the networks, so a resumed
  fit with a regularizer ends as an uninterrupted one too;
- the backbone is frozen while training (its ``requires_grad`` flags are put back after), so no
  gradient accumulates on it and no step can change it.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from mmke.data.record import EditRecord
from mmke.editors.base import Editor
from mmke.editors.nullspace import backbone_fingerprint
from mmke.editors.snapshot import RequiresGrad
from mmke.errors import ConfigError, MMKEError
from mmke.progress import progress_bar
from mmke.regularizers.base import Regularizer
from mmke.results.atomic import atomic_write_bytes
from mmke.tensor_state import load_optimizer_tensors, optimizer_tensors

FINAL = "final.safetensors"
CHECKPOINT = "checkpoint.safetensors"
T = TypeVar("T")


class TrainingError(MMKEError):
    """Training an editor's networks failed (a non-finite loss), with the step and the losses."""


@dataclass(frozen=True)
class TrainingSettings:
    """How ``fit`` optimises the editor's networks (Adam). ``batch_size``: train records per
    step, over all processes; ``checkpoint_every``: steps between checkpoints; ``grad_clip``:
    the gradient norm clip (None: none); ``seed``: the networks' init and the batch order."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    checkpoint_every: int = 100
    grad_clip: float | None = 100.0
    seed: int = 0
    #: steps after which the learning rate is multiplied by ``lr_cut_rate`` (LiveEdit: 10k, 0.1)
    lr_cuts: tuple[int, ...] = ()
    lr_cut_rate: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_cuts", tuple(int(c) for c in self.lr_cuts))
        for name in ("steps", "batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"editor.training.{name}={getattr(self, name)!r} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"editor.training.lr={self.lr!r} must be > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"editor.training.grad_clip={self.grad_clip!r} must be > 0 or null")

    def lr_factor(self, step: int) -> float:
        """The learning rate's multiplier at ``step``: ``lr_cut_rate`` per cut already passed."""
        return self.lr_cut_rate ** sum(step > cut for cut in self.lr_cuts)

    @classmethod
    def of(cls, value: TrainingSettings | Mapping[str, Any] | None) -> TrainingSettings:
        """From a YAML mapping (unknown keys are a ConfigError naming them)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"editor.training: unknown setting(s) {unknown}; "
                              f"known: {sorted(known)}")
        return cls(**dict(value))


@dataclass
class FitReport:
    """What ``fit`` did: loaded from the cache (``trained_now`` false) or trained, from which
    step (``resumed_from``; 0 for a fresh start), in how many seconds, with the last losses."""

    key: str
    path: str
    trained_now: bool
    steps_run: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    last_losses: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def records_digest(records: Sequence[EditRecord]) -> str:
    """A hash of the train records in order: every text field and every image path."""
    digest = hashlib.sha256()
    for r in records:
        images = (r.image, r.image_rephrase, r.m_loc)
        paths = [None if im is None else str(im.path) for im in images]
        digest.update(json.dumps([r.uid, r.task, r.src, r.pred, r.alt, r.rephrase, r.loc,
                                  r.loc_ans, r.m_loc_q, r.m_loc_a, paths]).encode())
    return digest.hexdigest()


def regularizer_settings(regularizer: Regularizer) -> dict[str, Any]:
    """The regularizer's class and its public scalar settings: its terms may enter a training
    objective, so a different regularizer must not read another's trained networks. An inactive
    one is just that, and names are left out, so ``reg=none`` and a default-built editor share
    their fits."""
    if not regularizer.active:
        return {"active": False}
    scalars = {k: v for k, v in sorted(vars(regularizer).items())
               if not k.startswith("_") and k != "name"
               and isinstance(v, (bool, int, float, str))}
    return {"class": type(regularizer).__qualname__, "active": True, **scalars}


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """all_gather with a gradient: forward stacks every process's ``[rows, ...]`` tensor into
    ``[world, rows, ...]``; backward sums, over the processes, the gradients their losses sent to
    this process's rows (each process's loss may read every process's rows)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        out = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(out, local.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # gloo has no reduce_scatter: sum all, keep this process's slice
        return grad[dist.get_rank()]


@dataclass(frozen=True)
class BatchShare:
    """This process's records of a step's batch: positions ``rank, rank + world, ...`` of the
    ``size`` records (``chosen[rank::world]``). Outside a process group: the whole batch.

    The processes' gradients are averaged, so a term enters a process's loss as its part of the
    whole batch's term times ``world``: ``row_mean`` and ``item_mean`` weigh a mean over this
    process's rows (or items, e.g. target tokens) that way; a term every process computes
    alike from ``gather``ed values is the whole batch's term already."""

    rank: int = 0
    world: int = 1
    size: int = 0

    @classmethod
    def whole(cls, size: int) -> BatchShare:
        return cls(0, 1, size)

    @property
    def positions(self) -> list[int]:
        """This process's rows' positions in the batch, in row order."""
        return list(range(self.rank, self.size, self.world))

    @property
    def rows(self) -> int:
        return len(range(self.rank, self.size, self.world))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """``[rows, ...]`` of this process -> ``[size, ...]`` of the whole batch, in batch order,
        differentiable (gradients reach the process that computed each row)."""
        if local.shape[0] != self.rows:
            raise ValueError(f"gather: {local.shape[0]} rows, this process holds {self.rows}")
        if self.world == 1:
            return local
        most = -(-self.size // self.world)  # shares differ by one row at most: pad to the larger
        padded = torch.cat([local, local.new_zeros(most - self.rows, *local.shape[1:])])
        stacked = _GatherRows.apply(padded)  # [world, most, ...]
        # batch position j is row j // world of process j % world
        return stacked.transpose(0, 1).reshape(most * self.world, *local.shape[1:])[: self.size]

    def gather_objects(self, local: Sequence[T]) -> list[T]:
        """``[rows]`` picklable values of this process -> the whole batch's ``[size]``, in batch
        order (SERAC's pair labels compare every process's inputs with every edit's text)."""
        if len(local) != self.rows:
            raise ValueError(f"gather_objects: {len(local)} rows, this process holds {self.rows}")
        if self.world == 1:
            return list(local)
        shares: list[list[T]] = [[] for _ in range(self.world)]
        dist.all_gather_object(shares, list(local))
        # batch position j is row j // world of process j % world
        return [shares[j % self.world][j // self.world] for j in range(self.size)]

    def gather_all(self, local: torch.Tensor) -> torch.Tensor:
        """``[world, ...]``: every process's ``local`` (same shape everywhere), no gradient."""
        if self.world == 1:
            return local.detach()[None]
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local.detach().contiguous())
        return torch.stack(out)

    def row_mean(self, per_row: torch.Tensor) -> torch.Tensor:
        """This process's part of the mean over the batch's rows of ``per_row`` ``[rows]``."""
        return self.item_mean(per_row.mean(), self.rows, self.size)

    def item_mean(self, local_mean: torch.Tensor, count: int, total: int | None = None
                  ) -> torch.Tensor:
        """This process's part of a mean over the whole batch's items, from the mean of its own
        ``count`` items (``total``: the batch's count; summed over the processes when None)."""
        if self.world == 1:
            return local_mean
        if total is None:
            counts = self.gather_all(torch.tensor(float(count), device=local_mean.device))
            total = int(counts.sum())
        return local_mean * (count * self.world / max(total, 1))


def batch_indices(n_records: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The records of optimisation ``step``: epochs are seeded permutations of the train split,
    read in order, so the batch of a step never depends on the steps before it."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_records)
        order = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(order[pos]))
    return out


class TrainedEditor(Editor):
    """An editor whose networks are trained in ``fit`` (once, then loaded from the cache).

    Subclasses implement ``build_networks``, ``training_loss`` and ``cache_settings``, and may
    override ``optimizer_groups`` (MEND's learned edit rates take their own learning rate).
    The networks are ``self.networks`` (set before training starts, so ``training_loss`` and
    ``forward`` read them alike); they are not part of the backbone, so
    ``restore`` never touches them and they stay loaded across edits."""

    needs_training = True
    #: bump when the networks or the objective change: the cache key includes it
    code_version: ClassVar[str] = "1"

    def __init__(self, training: TrainingSettings | Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, progress: bool = True,
                 regularizer: Regularizer | None = None, name: str = "") -> None:
        super().__init__(regularizer=regularizer, name=name)
        self.training = TrainingSettings.of(training)
        self.cache_dir = cache_dir
        self.progress = progress
        self.networks: nn.Module | None = None
        self.fit_report: FitReport | None = None
        #: where ``training_loss``'s records sit in the step's batch (set by ``fit`` per step)
        self.share: BatchShare | None = None

    # --- what a method supplies ----------------------------------------------------------

    @abstractmethod
    def build_networks(self, train_records: Sequence[EditRecord]) -> nn.Module:
        """Fresh networks (the torch seed is ``training.seed`` when called), on any device."""

    @abstractmethod
    def training_loss(self, batch: Sequence[EditRecord], step: int
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's objective on ``batch`` (this process's share of the step's records,
        ``share_of(batch)``), and its parts as floats for the progress bar. The processes'
        gradients are averaged, so a mean over the batch's records is ``share.row_mean``."""

    @abstractmethod
    def cache_settings(self) -> dict[str, Any]:
        """Every constructor setting that changes what training yields (JSON-serialisable)."""

    def optimizer_groups(self, networks: nn.Module) -> list[dict[str, Any]]:
        """Adam's parameter groups; one group at ``training.lr`` by default."""
        return [{"params": [p for p in networks.parameters() if p.requires_grad]}]

    def networks_trained(self) -> None:
        """Called once ``self.networks`` holds the trained (or loaded) networks."""

    def step_done(self, step: int) -> None:
        """Called after the optimiser step of ``step``, before a checkpoint is written: what the
        step leaves pending (MEND: the regularizer's ``after_step``) must be done by then."""

    def share_of(self, batch: Sequence[EditRecord]) -> BatchShare:
        """``batch``'s place in the step's batch: ``self.share`` in ``fit``, else all of it."""
        return self.share if self.share is not None else BatchShare.whole(len(batch))

    # --- the cache -------------------------------------------------------------------------

    def training_key(self, train_records: Sequence[EditRecord]) -> str:
        assert self.backbone is not None
        payload = json.dumps({
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "code_version": self.code_version,
            "backbone": backbone_fingerprint(self.backbone),
            "records": records_digest(train_records),
            "settings": self.cache_settings(),
            "regularizer": regularizer_settings(self.regularizer),
            "training": asdict(self.training),
        }, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def training_folder(self, key: str) -> Path:
        if self.cache_dir is None:
            raise ConfigError(f"editor={self.name} keeps its trained networks on disk: "
                              "set editor.cache_dir (the configs set ${paths.cache_dir})")
        return Path(self.cache_dir) / "trained" / self.name / key

    # --- fit ---------------------------------------------------------------------------------

    def fit(self, train_records: Sequence[EditRecord]) -> FitReport:
        """Load the trained networks from the cache, or train them (resuming a checkpoint)."""
        if self.backbone is None:
            raise RuntimeError("attach(backbone, templates) before fit()")
        records = list(train_records)
        if not records:
            raise ConfigError(f"editor={self.name} is trained on the task's train split, "
                              "which is empty")
        self.training_folder("")  # a missing cache_dir stops here, before the key is hashed
        key = self.training_key(records)
        folder = self.training_folder(key)
        torch.manual_seed(self.training.seed)
        networks = self.build_networks(records).to(self.backbone.device)
        self.networks = networks  # training_loss reads them here
        start = time.perf_counter()
        if _load(folder / FINAL, key, networks) is not None:
            report = FitReport(key, str(folder), trained_now=False)
        else:
            report = self._train(networks, records, key, folder)
        report.seconds = time.perf_counter() - start
        networks.eval()
        self.fit_report = report
        self.networks_trained()
        return report

    def _train(self, networks: nn.Module, records: list[EditRecord], key: str,
               folder: Path) -> FitReport:
        assert self.backbone is not None
        rank, world = _distributed()
        settings = self.training
        if settings.batch_size < world:
            raise ConfigError(f"editor.training.batch_size={settings.batch_size} gives some of the "
                              f"{world} processes no record; use at least {world}")
        optimizer = torch.optim.Adam(self.optimizer_groups(networks), lr=settings.lr)
        for group in optimizer.param_groups:  # saved with the groups, so a resume keeps it
            group["initial_lr"] = group["lr"]
        first = _load(folder / CHECKPOINT, key, networks, optimizer, self.regularizer) or 0
        report = FitReport(key, str(folder), trained_now=True, resumed_from=first)
        frozen = RequiresGrad(self.backbone.model)
        self.backbone.model.requires_grad_(False)
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        bar = progress_bar(range(first, settings.steps), initial=first, total=settings.steps,
                           desc=f"fit {self.name}", disable=not self.progress or rank != 0)
        try:
            networks.train()
            for step in bar:
                chosen = batch_indices(len(records), settings.batch_size, step, settings.seed)
                self.share = BatchShare(rank, world, len(chosen))
                loss, parts = self.training_loss([records[i] for i in chosen[rank::world]], step)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"editor={self.name}: non-finite training loss at step {step} "
                        f"({parts}); lower editor.training.lr or check the settings. "
                        f"Checkpoints so far are in {folder}")
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * settings.lr_factor(step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _average_gradients(trainable, world)
                if settings.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                optimizer.step()
                self.step_done(step)
                report.steps_run += 1
                report.last_losses = {"loss": loss.item(), **parts}
                bar.set_postfix({k: f"{v:.3g}" for k, v in report.last_losses.items()})
                done = step + 1
                if rank == 0 and done % settings.checkpoint_every == 0 and done < settings.steps:
                    _write(folder / CHECKPOINT, key, networks, optimizer, done, self.regularizer)
        finally:
            self.share = None
            frozen.restore()
            bar.close()
        if rank == 0:
            _write(folder / FINAL, key, networks, None, settings.steps)
            (folder / CHECKPOINT).unlink(missing_ok=True)
        if world > 1:
            dist.barrier()
        return report


def _average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    if world == 1:
        return
    for p in params:
        if p.grad is None:  # a parameter this share did not reach still takes the others' mean
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def _write(path: Path, key: str, networks: nn.Module, optimizer: torch.optim.Optimizer | None,
           step: int, regularizer: Regularizer | None = None) -> None:
    """Networks (``net.*``), Adam state (``opt.<index>.<name>``), the regularizer's training
    state (``reg.*``), the RNG and the step, in one safetensors file, written atomically."""
    # cloned: tied weights (an LM head sharing its embedding) are one storage, which safetensors
    # refuses to write twice
    tensors = {f"net.{k}": v.detach().cpu().clone().contiguous()
               for k, v in networks.state_dict().items()}
    meta = {"key": key, "step": str(step)}
    if optimizer is not None:
        tensors.update({f"opt.{k}": v for k, v in optimizer_tensors(optimizer).items()})
        meta["param_groups"] = json.dumps(optimizer.state_dict()["param_groups"])
        tensors["rng.torch"] = torch.get_rng_state()
    if regularizer is not None:
        tensors.update({f"reg.{k}": v.detach().cpu().clone().contiguous()
                        for k, v in regularizer.training_state().items()})
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load(path: Path, key: str, networks: nn.Module,
          optimizer: torch.optim.Optimizer | None = None,
          regularizer: Regularizer | None = None) -> int | None:
    """Read ``path`` into ``networks`` (and ``optimizer``, ``regularizer`` and the RNG): the step
    it holds, or None when it is missing, unreadable or of another key (then nothing is
    changed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError):
        return None
    net = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
    expected = networks.state_dict()
    if set(net) != set(expected) or any(net[k].shape != expected[k].shape for k in net) \
            or not all(torch.isfinite(v).all() for v in net.values() if v.is_floating_point()):
        return None
    networks.load_state_dict(net)
    if optimizer is not None:
        load_optimizer_tensors(optimizer, {k[len("opt."):]: v for k, v in tensors.items()
                                           if k.startswith("opt.")},
                               json.loads(meta["param_groups"]))
        torch.set_rng_state(tensors["rng.torch"])
    if regularizer is not None:
        regularizer.load_training_state({k[len("reg."):]: v for k, v in tensors.items()
                                         if k.startswith("reg.")})
    return int(meta.get("step", 0))
