"""Deterministic demo problems for the launchers and benchmarks.

Inputs are generated in fixed blocks of time steps, each from its own seed,
so any window [start, start + length) of a 10M+ step sequence can be made
where it is needed (shard-locally) and is identical whatever the sharding.
"""
from __future__ import annotations

import re

import torch

from . import cells as C

CELLS = {
    "diag-gru": C.DiagGRU,
    "diag-lstm": C.DiagLSTM,
    "gru": C.GRU,
    "lstm": C.LSTM,
    "elman": C.Elman,
}
_BLOCK = 1 << 16


def parse_count(text) -> int:
    """'10M' -> 10_000_000, '2.5k' -> 2500, '1e6' -> 1_000_000, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbB]?)\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse a count from {text!r} (examples: 4096, 1e6, 2.5k, 10M, 1G)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}[m.group(2).lower()]
    value = float(m.group(1)) * mult
    if value != int(value) or value < 0:
        raise ValueError(f"count {text!r} is not a non-negative integer")
    return int(value)


def make_cell(name: str, input_size: int, hidden: int, *, seed: int = 0, dtype=torch.float32, device="cpu"):
    """A seeded random built-in cell (identical on every rank)."""
    if name not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}; got {name!r}")
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        cell = CELLS[name](input_size, hidden)
    return cell.to(device=device, dtype=dtype)


def make_inputs(start: int, length: int, batch: int, input_size: int, *, seed: int = 0,
                dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Inputs for global steps [start, start + length): (length, batch, input_size), N(0, 1).

    Generated block by block on ``device`` (a GPU fills 100M steps in seconds), each block from its
    own seed, so any sharding of [0, T) on the same kind of device sees the same values."""
    out = torch.empty(length, batch, input_size, dtype=dtype, device=device)
    gen_device = torch.device(device)
    t = start
    while t < start + length:
        blk = t // _BLOCK
        g = torch.Generator(device=gen_device).manual_seed(seed * 1_000_003 + blk + 1)
        block = torch.randn(_BLOCK, batch, input_size, generator=g, device=gen_device)
        lo = t - blk * _BLOCK
        hi = min(_BLOCK, start + length - blk * _BLOCK)
        out[t - start:t - start + hi - lo] = block[lo:hi].to(device=device, dtype=dtype)
        t += hi - lo
    return out


def shard_range(total: int, world_size: int, rank: int):
    """Contiguous near-equal shard [start, start + length) of ``total`` steps for ``rank``."""
    base, extra = divmod(total, world_size)
    length = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    return start, length
