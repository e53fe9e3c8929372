"""One run over several processes: who am I, which records are mine, and gathering the rows.

``accelerate launch run.py ...`` (or ``torchrun``) starts the same run in N processes. Each
process edits a contiguous shard of whole work units (one record for single edits, one stream of
T records for the sequential protocol), the rows keep their global ``index``, and the main
process gathers every row and alone writes the run folder. With one process every method here is
the identity, so the runner has one code path.

The process group and the device come from ``accelerate.PartialState``; no accelerator is named
here. On a machine without an accelerator the processes run on the CPU over gloo.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, get_int_from_env, parse_flag_from_env

from mmke.errors import ConfigError

T = TypeVar("T")

#: Environment variables that carry the number of processes and this process's rank, as set by
#: torchrun (``accelerate launch --multi_gpu``) or by MPI (``accelerate launch --cpu`` with a
#: hostfile). The same lists Accelerate reads.
WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_ENV = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_WORLD_SIZE_ENV = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                        "MV2_COMM_WORLD_LOCAL_SIZE")


def launched_world_size() -> int:
    """Number of processes the launcher started (1 for ``python run.py``), read from the
    environment, so it is known before any process group exists."""
    return max(1, get_int_from_env(list(WORLD_SIZE_ENV), 1))


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 for ``python run.py``)."""
    return get_int_from_env(list(RANK_ENV), 0)


def shard_range(n_items: int, unit: int, rank: int, world_size: int) -> range:
    """The items (by global position) that process ``rank`` of ``world_size`` works on.

    Items come in units of ``unit`` consecutive items that must stay in one process (a stream of
    the sequential protocol). Whole units are dealt out contiguously and as evenly as possible,
    earlier ranks taking one more when they do not divide evenly, so concatenating the shards in
    rank order gives back ``range(n_items)``.
    """
    if unit < 1:
        raise ValueError(f"unit must be >= 1, got {unit}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if n_items % unit:
        raise ConfigError(f"{n_items} records do not split into streams of T={unit}; "
                          "set n_edits to a multiple of protocol.T")
    units = n_items // unit
    if units < world_size:
        what = (f"{units} edit(s)" if unit == 1 else
                f"{units} stream(s) of T={unit} records, and a stream cannot be split,")
        raise ConfigError(f"{n_items} records make {what} for {world_size} processes: each "
                          f"process needs at least one; raise n_edits or launch at most "
                          f"{max(units, 1)} process(es)")
    base, extra = divmod(units, world_size)
    first = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    return range(first * unit, (first + count) * unit)


def default_cpu_threads(world_size: int, local_world_size: int, cores: int) -> int | None:
    """torch intra-op threads for one process under ``cpu_threads=auto``: None (torch's own
    default) for a single process; with several processes on one machine, the cores divided
    among them, so their threads do not compete for the same cores."""
    if world_size <= 1:
        return None
    return max(1, cores // max(1, local_world_size))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Processes:
    """The processes of one run, over ``accelerate.PartialState``.

    Build it with :meth:`from_environment`. ``device`` is the device Accelerate assigns to this
    process (the CPU under ``ACCELERATE_USE_CPU`` or when no accelerator exists).
    """

    def __init__(self, state: PartialState) -> None:
        self._state = state
        self.rank: int = state.process_index
        self.world_size: int = state.num_processes
        self.local_world_size: int = max(1, get_int_from_env(list(LOCAL_WORLD_SIZE_ENV),
                                                             self.world_size))
        self.device: torch.device = torch.device(state.device)

    @classmethod
    def from_environment(cls) -> Processes:
        """Join the process group the launcher set up (none for a plain ``python run.py``).

        Accelerate only takes the CPU route for several processes when asked to
        (``ACCELERATE_USE_CPU``); without an accelerator there is no other route, so it is taken
        then too: otherwise every process would believe it runs alone and write the run folder.
        """
        launched = launched_world_size()
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (
            launched > 1 and not torch.accelerator.is_available())
        processes = cls(PartialState(cpu=cpu))
        if processes.world_size != launched:
            raise ConfigError(f"the launcher started {launched} processes but Accelerate joined "
                              f"{processes.world_size}; check the accelerate launch settings")
        return processes

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes the run folder and logs."""
        return self.rank == 0

    def shard(self, items: Sequence[T], unit: int = 1) -> tuple[int, Sequence[T]]:
        """(global position of the first item, this process's items); see :func:`shard_range`.
        A single process takes everything as it is (the protocol checks its own rules)."""
        if self.world_size == 1:
            return 0, items
        mine = shard_range(len(items), unit, self.rank, self.world_size)
        return mine.start, items[mine.start:mine.stop]

    def gather(self, payload: T) -> list[T]:
        """Every process's ``payload``, in rank order, returned to every process."""
        if self.world_size == 1:
            return [payload]
        return gather_object([payload])

    def placement(self, backbone: Mapping[str, Any]) -> dict[str, str]:
        """Keyword overrides that build the backbone config ``backbone`` on this process's device.

        ``device: auto`` becomes the device Accelerate assigned (a CPU under ``--cpu``); an
        explicit device is kept. A ``device_map`` spreads one model over all visible devices,
        which several processes cannot share, so it is refused with more than one process.
        """
        if self.world_size > 1 and backbone.get("device_map") is not None:
            raise ConfigError(f"backbone.device_map={backbone.get('device_map')} spreads one model "
                              f"over several devices, which {self.world_size} processes cannot "
                              "share: run it in one process (python run.py), or drop device_map "
                              "so that each process holds a whole copy on its own device")
        if "device" in backbone and backbone.get("device") in (None, "", "auto"):
            return {"device": str(self.device)}
        return {}

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (it fills on-disk caches: the mini world, the
        tiny pretraining), the others after it, so they only read what it wrote."""
        with self._state.main_process_first():
            yield

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to do for a single process)."""
        if self.world_size > 1:
            self._state.wait_for_everyone()

    def set_cpu_threads(self, setting: int | str | None) -> int:
        """Apply the ``cpu_threads`` setting (``auto`` or a count) and return torch's thread
        count. Several CPU processes on one machine are only faster than one when each keeps to
        its share of the cores; torch's default would give every process all of them."""
        if setting in (None, "auto"):
            threads = default_cpu_threads(self.world_size, self.local_world_size, usable_cores())
        else:
            try:
                threads = int(setting)
            except (TypeError, ValueError):
                raise ConfigError(f"cpu_threads={setting!r}: use auto or a positive count") from None
            if threads < 1:
                raise ConfigError(f"cpu_threads={setting!r}: use auto or a positive count")
        if threads is not None:
            torch.set_num_threads(threads)
        return torch.get_num_threads()

    def close(self) -> None:
        """Leave the process group together (nothing to do for a single process): a process that
        leaves while another still uses the group aborts it."""
        if self.world_size > 1:
            self.barrier()
            self._state.destroy_process_group()
