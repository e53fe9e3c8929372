"""Peak memory of each edit, the cost M-ORE plots against the edit index (its Figure 7).

``MemoryMeter.start()`` before an edit and ``stop()`` after it give two numbers in MiB:

- ``peak_mem_mb``: the peak memory while the edit ran. On an accelerator, the most memory
  allocated on the backbone's device since the edit started (the peak statistics are reset at
  ``start``). On the CPU, the process's resident set: the kernel keeps one high-water mark per
  process (``getrusage``), which cannot be reset without side effects, so when the edit raised
  it, the new mark is the edit's peak; otherwise the larger resident set of the edit's start
  and end (a lower bound of the peak, exact for memory that stays);
- ``incremental_mem_mb``: that peak minus the memory in use just before the run's first edit
  (allocated memory on an accelerator, the resident set on the CPU). A method that grows
  memories or adapters with every edit shows a rising line; one that restores its weights, a
  flat one.

No accelerator is named here: ``torch.accelerator`` speaks for whichever the device is.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import psutil
import torch

MIB = 1024 * 1024


@dataclass(frozen=True)
class EditMemory:
    """Memory of one edit, in MiB."""

    peak_mem_mb: float
    incremental_mem_mb: float


def host_peak_mb() -> float:
    """The process's resident-set high-water mark in MiB (``ru_maxrss`` is in KiB on Linux,
    in bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def host_rss_mb() -> float:
    """The process's resident set now, in MiB."""
    return psutil.Process().memory_info().rss / MIB


class MemoryMeter:
    """Measures the edits on one device; the first ``start`` fixes the baseline."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        self.on_accelerator = accelerator is not None and self.device.type == accelerator.type
        self.baseline_mb: float | None = None
        self._host_start = (0.0, 0.0)  # (high-water mark, resident set) at the edit's start

    def start(self) -> None:
        """Call right before an edit."""
        if self.on_accelerator:
            index = self._index()
            if self.baseline_mb is None:
                self.baseline_mb = torch.accelerator.memory_allocated(index) / MIB
            torch.accelerator.reset_peak_memory_stats(index)
            return
        self._host_start = (host_peak_mb(), host_rss_mb())
        if self.baseline_mb is None:
            self.baseline_mb = self._host_start[1]

    def stop(self) -> EditMemory:
        """Call right after the edit: its peak and its increment over the baseline."""
        if self.baseline_mb is None:
            raise RuntimeError("MemoryMeter.stop() without start()")
        if self.on_accelerator:
            peak = torch.accelerator.max_memory_allocated(self._index()) / MIB
        else:
            mark_before, rss_before = self._host_start
            mark = host_peak_mb()
            peak = mark if mark > mark_before else max(rss_before, host_rss_mb())
        return EditMemory(peak, peak - self.baseline_mb)

    def _index(self) -> int:
        return self.device.index if self.device.index is not None else \
            torch.accelerator.current_device_index()
