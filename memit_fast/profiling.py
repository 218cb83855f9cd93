"""Wall time and peak GPU memory per phase of an edit, with NVTX ranges for Nsight when asked.

    timer = PhaseTimer()
    memit_fast.apply(model, tok, requests, hparams, timer=timer)
    timer.totals()  # {"z": {"seconds": ..., "peak_gib": ..., "calls": ...}, ...}
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

# the allocator's high-water mark from before the last `restart_peak` (0 after a phase starts):
# code that measures its own peak resets the allocator's, and the phase keeps the higher one
_earlier_peak = 0


def restart_peak(device=None) -> int:
    """Reset the CUDA allocator's high-water mark of `device` (default: the current one) for a
    region measuring its own peak (one z chunk), without losing it for the enclosing PhaseTimer
    phase; returns memory_allocated(device)."""
    global _earlier_peak
    _earlier_peak = max(_earlier_peak, torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


class PhaseTimer:
    """Records (phase, seconds, peak CUDA memory in bytes) for each timed region.

    On CUDA each region synchronises before and after, so times are the device's; peak memory is
    the allocator's high-water mark inside the region (torch.cuda.max_memory_allocated).
    """

    def __init__(self, nvtx: bool = False):
        self.records: list[tuple[str, float, int]] = []
        self.nvtx = nvtx

    @contextmanager
    def __call__(self, phase: str):
        global _earlier_peak
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            _earlier_peak = 0
        if self.nvtx and cuda:
            torch.cuda.nvtx.range_push(phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if self.nvtx and cuda:
                torch.cuda.nvtx.range_pop()
            self.records.append((phase, seconds, max(torch.cuda.max_memory_allocated(), _earlier_peak) if cuda else 0))

    def totals(self) -> dict[str, dict]:
        """{phase: {"seconds": total, "peak_gib": max, "calls": n}} in first-seen order."""
        out: dict[str, dict] = {}
        for phase, seconds, peak in self.records:
            entry = out.setdefault(phase, {"seconds": 0.0, "peak_gib": 0.0, "calls": 0})
            entry["seconds"] += seconds
            entry["peak_gib"] = max(entry["peak_gib"], peak / 2**30)
            entry["calls"] += 1
        return out


class _NoTimer:
    @contextmanager
    def __call__(self, phase: str):
        yield


NO_TIMER = _NoTimer()
