#!/usr/bin/env python
"""Profile target: one fused DiagGRU Newton iteration at T=2^20, B=1, D=1024 (for ncu / nsys).

    ncu --section SpeedOfLight --section Occupancy --section LaunchStats -k regex:_fused_diag_gru \\
        -c 1 python benchmarks/profile_fused.py
"""
import torch

import common  # noqa: F401
from seqpar.cells import DiagGRU
from seqpar.kernels.fused_diag_gru import fused_diag_gru_step

T, B, D = 1 << 20, 1, 1024
torch.manual_seed(0)
cell = DiagGRU(64, D).cuda()
with torch.no_grad():
    xp = cell.project_inputs(torch.randn(T, B, 64, device="cuda"))
    h = torch.randn(T, B, D, device="cuda") * 0.3
    bnd = torch.zeros(B, D, device="cuda")
    for _ in range(3):
        out, stats = fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd)
torch.cuda.synchronize()
print("done", float(stats[0]))
