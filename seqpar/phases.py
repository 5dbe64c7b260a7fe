"""Where a solve's time goes, phase by phase: ``SolveInfo.phase_s`` (off unless asked).

Set the environment variable ``SEQPAR_PHASE_TIMES=1`` (on every rank) and each Newton solve
records the wall time of its phases in ``info.phase_s`` (seconds, summed over iterations):

* ``setup``: the shard layout and the first boundary exchange (P > 1), the initial guess;
* ``pass``: the local passes (fused kernels, or the torch reference);
* ``carries``: the pipelined loop's scan of run summaries for the next pass;
* ``compose``: the shard's composed map (pipelined loop, P > 1);
* ``exchange``: the all-gather of summaries and residuals, and the host sync on the residual;
* ``incoming``: the exact incoming state from the gathered summaries (P > 1);
* ``correct``: the look-back loop's incoming-state correction (P > 1);
* ``finish``: the converged boundary's re-check (P > 1) and any fallback.

``SEQPAR_PHASE_TIMES=sync`` also waits for the device at the end of every phase, so that
asynchronous GPU work is charged to the phase that queued it rather than to the next sync
(``exchange``); that serialises host and device, so the total is slower: for diagnosis only.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Dict, Optional

import torch

ENV = "SEQPAR_PHASE_TIMES"


class PhaseTimes:
    """``mark(name)`` charges the time since the previous mark (or construction) to phase ``name``.
    Disabled (the default): ``mark`` returns at once and ``times`` stays empty."""

    def __init__(self, device: Optional[torch.device] = None, mode: Optional[str] = None):
        mode = os.environ.get(ENV, "") if mode is None else mode
        if mode not in ("", "0", "1", "sync"):  # a warning, not an error: ranks must not fail mid-solve
            warnings.warn(f"{ENV} must be unset, 0, 1 or sync; got {mode!r}: phase times are off", stacklevel=2)
            mode = ""
        self.enabled = mode in ("1", "sync")
        self.sync = mode == "sync" and device is not None and torch.device(device).type == "cuda"
        self.device = device
        self.times: Dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        if not self.enabled:
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._last
        self._last = now
