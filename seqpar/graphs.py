"""CUDA graphs of one rank's Newton iterations: short solves without per-kernel launch costs.

A short solve on one GPU (e.g. GRU(1, 1), B = 16, T = 100k: ~0.2 ms of device work) is bound by
the host: every iteration launches a pass and its carry scan (5-10 launches with their torch ops,
~100-200 us of host time) and then waits for the residual.  Here, on one rank, those launches are
captured once into CUDA graphs and replayed: one graph launch per iteration instead.  The
iterates, residuals, iteration counts and stopping decisions are those of the eager loops
(:func:`seqpar.pipeline.pipelined_iterations`, ``seqpar.newton._iterations``).

Graphs need fixed addresses, so a :class:`GraphedLoop` owns static buffers: the inputs (T, B, I)
(same strides as the caller's) and the projected inputs ``xp`` (T, B, G) that a captured graph makes
of them (``cell.project_inputs``; or, where the caller passes ``xp``, a static copy of it), ``h0``
(B, D) and two iterate buffers (T, B, D), and binds the cell's kernels to them.  A solve copies its
inputs, ``h0`` and initial guess in, replays, and returns a copy of the final iterate.  The iterate
``h^k`` lives in buffer ``k % 2``; the graph of iteration k reads it and writes ``h^{k+1}`` into the
other buffer.

* Pipelined loop (``first``, ``odd``, ``even`` graphs): the first pass summarises ``h^0``; the graph of
  iteration k >= 1 (odd or even k) runs the pass from ``h^{k-1}`` plus the next carries.  The even graph
  copies its small results (summaries, residual, carries) into the first graph's, which the odd
  graph reads.
* Look-back loop (two graphs): the pass of iteration k reads ``h^k`` and writes ``h^{k+1}``.

Pipelined graphs also run the stopping rule on the device (:mod:`seqpar.kernels.stopping`): each ends with a
one-thread kernel that records the residual and, once the rule says stop, turns the later passes into no-ops.
So a solve queues as many iterations as the key's previous solve took (its first: ``EXPECTED_ITERATIONS``),
reads the state once, and hands the residuals to the host's rule in order (callbacks and the deferred argument
check run then); the host rule must stop at the same iterate (else RuntimeError). That first queue is one
chained graph (first pass and iterations captured together, each pass's small results in fresh buffers: one
launch, no copies between passes), captured per queue length on first use; a handoff graph moves its last
results to where the single-iteration graphs read them, only when the solve goes on past it. Iterations past
the queue are queued ``QUEUE_MORE`` at a time. The device never waits for the host between iterations; a queue
longer than needed costs a few microseconds of no-op launches per extra iteration. The first graph also counts
the NaN / Inf of the static inputs, h0 and first iterate (:mod:`seqpar.kernels.finite`), read with the state:
the solve's deferred NaN / Inf check of the caller's tensors (:class:`seqpar.validation.PendingFinite`) needs
no launch or read of its own. The look-back graphs read the residual after every iteration.

When (:func:`graphed_loop`): one rank (the caller checks), a CUDA device, the Triton backend with a
fused or pipelined kernel for the cell, at most ``GRAPH_MAX_ELEMENTS`` states.  The first solve of a
key (cell and its parameters' storage and versions, shapes, strides, dtypes, linearisation, loop)
runs eagerly (it also compiles the kernels); the second captures; later ones replay.  An in-place
change of a parameter (an optimizer step) changes the key, so a training loop keeps the eager path;
a capture that fails leaves that key eager.  ``GRAPH_CACHE_SIZE`` keys hold graphs (least recently
used dropped); ``SEQPAR_CUDA_GRAPHS=0`` or ``seqpar.graphs.ENABLED = False`` turns it all off,
:func:`clear` frees the held buffers.
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from typing import Callable, Optional

import torch

from .kernels import finite, stopping
from .validation import PendingFinite, cell_tensors, tensors_key

ENABLED = os.environ.get("SEQPAR_CUDA_GRAPHS", "1") not in ("0", "", "false", "off")
GRAPH_MAX_ELEMENTS = 2**23  # T * B * D: static buffers of about 20 bytes per state are held per key
GRAPH_CACHE_SIZE = 2
SEEN_SIZE = 16
DEVICE_TYPES = ("cuda",)
EXPECTED_ITERATIONS = 4  # iterations queued by a key's first replayed solve (later: the previous solve's count)
QUEUE_MORE = 2  # iterations queued at a time after that, until the device's stopping rule stops
# a solve's first queue of n passes replays as one chained graph (first pass + n - 1 iterations, results in
# fresh buffers: no copies between passes, one launch) where those results take at most CHAIN_MAX_FRACTION of the
# loop's static buffers (GRU(1, 1), B = 16, T = 100k: 4 passes of 1.7 MB against 38 MB; GRU(4, 4): 5-6 of 4.8 MB
# against 154 MB), so that graphs stay under twice the eager loop's peak memory (1.62-1.69x without chains, run
# 57); one length is kept per key (a solve needing another count recaptures, a few milliseconds).  Where the
# passes project the raw inputs themselves (no xp buffer), the budget still counts the xp they do without: the
# same chains as with projected inputs, in less memory than those graphs took
CHAIN_MAX_FRACTION = 0.2
CHAIN_CACHE = 1

_graphs: "OrderedDict[tuple, Optional[GraphedLoop]]" = OrderedDict()
_seen: "OrderedDict[tuple, None]" = OrderedDict()


class CudaGraph:
    """One captured function: ``capture(fn)`` records ``fn()`` (returns its outputs, which live at
    fixed addresses), ``replay()`` reruns it.  Tests substitute an eager stand-in."""

    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, fn: Callable):
        side = torch.cuda.Stream()  # a warm-up run off the capture first (lazy initialisation, loading)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


Graph = CudaGraph
new_pool = torch.cuda.graph_pool_handle


def clear() -> None:
    """Drop every held graph and its buffers (and the record of keys seen once)."""
    _graphs.clear()
    _seen.clear()


def _key(cell, structure, src, h0, opts, chunk: int, pipelined: bool, projects: bool) -> tuple:
    tensors = opts.cell_key if opts.cell_key is not None else tensors_key(*cell_tensors(cell))
    return (id(cell), type(cell), tensors, src.shape, src.stride(), src.dtype, h0.dtype, src.device, structure,
            opts.backend, chunk, pipelined, projects)


def graphed_loop(cell, structure, xp: Optional[torch.Tensor], h0: torch.Tensor, opts, chunk: int,
                 pipelined: bool, inputs: Optional[torch.Tensor] = None) -> Optional["GraphedLoop"]:
    """The captured loop for this solve (one rank), or None: run the eager loop (see the module).
    ``xp`` the projected inputs, or None and ``inputs`` (projected inside the graphs)."""
    src = xp if xp is not None else inputs
    n, B = src.shape[:2]
    if (not ENABLED or src.device.type not in DEVICE_TYPES or opts.backend != "triton" or n == 0
            or n * B * h0.shape[1] > GRAPH_MAX_ELEMENTS):
        return None
    if src.is_cuda and src.device.index not in (None, torch.cuda.current_device()):
        return None  # graphs capture on the current device's streams
    key = _key(cell, structure, src, h0, opts, chunk, pipelined, xp is None)
    if key in _graphs:
        loop = _graphs[key]
        _graphs.move_to_end(key)
        return loop if loop is not None and loop.cell() is cell else None
    if key not in _seen:  # first solve of this key: eager (and the kernels compile)
        _seen[key] = None
        while len(_seen) > SEEN_SIZE:
            _seen.popitem(last=False)
        return None
    try:
        loop = GraphedLoop(cell, structure, src, h0, opts, chunk, pipelined, projects=xp is None)
    except Exception:  # noqa: BLE001 - not capturable (or no kernel): this key stays eager
        loop = None
    _graphs[key] = loop
    while len(_graphs) > GRAPH_CACHE_SIZE:
        _graphs.popitem(last=False)
    return loop


def _projected(cell, x, dtype, row_major: bool) -> torch.Tensor:
    """``xp`` of the inputs ``x``, as the eager solve projects them (row-major if asked)."""
    from .newton import projected_inputs

    xp = projected_inputs(cell, x, dtype)
    return xp.contiguous() if row_major else xp


def _record(res, state, stats=None) -> None:
    """Queue the record of pass ``res``'s residual (``res.stats``, or ``stats``: where they were copied to) into
    the device stopping state, unless the pass did it itself."""
    if not getattr(res, "recorded", False):
        stopping.record((res.stats if stats is None else stats)[0], state)


def _copy_into(dst, src) -> None:
    """Copy the tensors of ``src`` into those of ``dst`` (tensors, or tuples of them; None skipped)."""
    if isinstance(dst, torch.Tensor):
        if dst.data_ptr() != src.data_ptr():  # (an iterate buffer both name: nothing to copy)
            dst.copy_(src)
    elif isinstance(dst, tuple):
        for d, s in zip(dst, src):
            _copy_into(d, s)


class GraphedLoop:
    """Static buffers and captured iterations of one key (see the module).  ``run`` is the eager
    loops' ``(h, boundary, iterations)`` for one rank."""

    def __init__(self, cell, structure, src, h0, opts, chunk: int, pipelined: bool, projects: bool = False):
        """``src``: the projected inputs (T, B, G), or with ``projects`` the inputs (T, B, I), which a
        captured graph projects (``cell.project_inputs``) into the static ``xp``."""
        from .backend import pipelined_stepper
        from .newton import LocalPass

        self.cell = weakref.ref(cell)
        self.h0 = h0.new_zeros(h0.shape)
        self.state = None  # the device-side stopping state (pipelined loop), see _run_queued
        self.checks_finite = False  # whether the first graph counts NaN / Inf of the caller's tensors' copies
        self.expected = EXPECTED_ITERATIONS
        # whether h[0] holds zeros (a solve without initial guess starts there): a pipelined solve's take_final
        # leaves it so; captures (which run passes) and initial guesses overwrite it
        self.guess_zeroed = False
        n, B = src.shape[:2]
        self.h = [h0.new_zeros(n, B, h0.shape[1]), h0.new_zeros(n, B, h0.shape[1])]
        pool = new_pool()
        self.x = self.project = self.xp = pipe = None
        if projects:  # the static inputs, same strides as the caller's, and the graph projecting them
            self.x = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device=src.device).zero_()
            if pipelined:  # a kernel that projects them itself: no xp, no projection graph
                pipe = pipelined_stepper(cell, structure, self.x, opts.backend, raw_inputs=True)
            if pipe is None:
                self.project = Graph(pool)
                # the look-back steppers may copy xp to row-major once when they are built, which a graph
                # would keep stale: row-major for them; the pipelined kernels read xp of any strides
                self.xp = self.project.capture(lambda: _projected(cell, self.x, h0.dtype, row_major=not pipelined))
        elif pipelined:
            self.xp = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device=src.device).zero_()
        if pipe is None and pipelined:
            pipe = pipelined_stepper(cell, structure, self.xp, opts.backend)
        if pipe is not None:
            # what a solve reads back, in one copy: the stopping state, then the NaN / Inf counts of the static
            # inputs, h0 and first iterate (checks of the caller's tensors, see _settle_finite_check)
            n_state = stopping.STATE_SIZE + stopping.HISTORY
            self.readback = torch.zeros(n_state + 3, dtype=torch.float64, device=src.device)
            self.state = self.readback[:n_state]
            stopping.reset(self.state, opts.tol, opts.max_iter, opts.patience)
            # the state's starting values, copied in by the first graph; rewritten when the options change
            self.state_options = (opts.tol, opts.max_iter, opts.patience)
            self.state_start = self.state[:stopping.STATE_SIZE].clone()
            # its host copy (pinned: the read is queued, then waited for with an event)
            cuda = self.readback.is_cuda
            self.host_readback = torch.empty(self.readback.shape, dtype=self.readback.dtype, pin_memory=cuda)
            self.read_event = torch.cuda.Event() if cuda else None
            self._capture_pipelined(pipe, pool)
        else:  # as the eager path: the look-back loop where the cell has no pipelined kernel
            if self.project is None:
                self.xp = src.new_zeros(src.shape)
            elif not self.xp.is_contiguous():  # projected for a pipelined kernel the cell lacks: stay eager
                raise RuntimeError("the look-back loop needs row-major xp")
            local = LocalPass(cell, self.xp, opts, chunk)
            if local.fused is None:
                raise RuntimeError("no fused kernel")
            self._capture_lookback(local, pool)

    def _carries(self, pipe, res):
        return res.carry if res.carry is not None else pipe.carries(res, self.h0)

    def _capture_pipelined(self, pipe, pool) -> None:
        h, h0, state = self.h, self.h0, self.state
        first, odd, even = Graph(pool), Graph(pool), Graph(pool)

        counts = self.readback[state.numel():]
        checked = [t for t in (self.x, h0, h[0]) if t is not None and finite.dense_flat(t) is not None]
        self.checks_finite = len(checked) == 3  # inputs, h0, first iterate: see _settle_finite_check

        def first_pass():
            state[:stopping.STATE_SIZE].copy_(self.state_start)
            if self.checks_finite:
                counts.zero_()
                for i, t in enumerate(checked):
                    finite.count_nonfinite(t, counts[i:])
            res = pipe.first(h[0], h0, next_start=h0, stop=state)
            _record(res, state)
            return res, self._carries(pipe, res)

        def step(src: int, res, carries):
            new = pipe.step(h[src], h0, res, carries, h0, out=h[1 - src], next_start=h0, stop=state)
            return new, self._carries(pipe, new)

        res0, car0 = first.capture(first_pass)

        def odd_step():
            new, car = step(0, res0, car0)
            _record(new, state)
            return new, car

        res1, car1 = odd.capture(odd_step)

        def even_step():
            new, car = step(1, res1, car1)
            _copy_into(tuple(res0), tuple(new))  # where the odd graph reads them (res0.out is None)
            _copy_into(car0, car)
            _record(new, state, stats=res0.stats)

        even.capture(even_step)
        self.graphs = [first, odd, even]
        self._pool, self._passes, self._handoff = pool, (first_pass, step), ((res0, car0), (res1, car1))
        self._pass_bytes = sum(t.numel() * t.element_size() for t in (*res0, car0)
                               if isinstance(t, torch.Tensor) and t.data_ptr() not in (h[0].data_ptr(),
                                                                                       h[1].data_ptr()))
        self._static_bytes = sum(t.numel() * t.element_size() for t in (h[0], h[1], h0, self.xp, self.x)
                                 if t is not None)
        if self.xp is None:  # passes that project the raw inputs: the budget of the projected inputs they do without
            self._static_bytes += 3 * h[0].numel() * h[0].element_size()
        self.chains: "OrderedDict[int, Optional[tuple]]" = OrderedDict()

    def _chain(self, n: int) -> Optional[tuple]:
        """``(graph, handoff)`` replaying passes 0 .. n-1 as one graph, or None (n < 2, too large, or its
        capture failed).  ``handoff`` copies the chain's last results to where the single-iteration graphs
        read them: replayed only when the solve needs pass n and later.  Captured on first use, before the
        solve copies its inputs in (a capture runs the passes once)."""
        if n < 2 or n * self._pass_bytes > CHAIN_MAX_FRACTION * self._static_bytes:
            return None
        if n in self.chains:
            self.chains.move_to_end(n)
            return self.chains[n]
        first_pass, step = self._passes
        state = self.state
        graph, handoff = Graph(self._pool), Graph(self._pool)

        def chain():
            res, car = first_pass()
            for k in range(1, n):
                res, car = step((k - 1) % 2, res, car)
                _record(res, state)
            return res, car

        try:
            self.guess_zeroed = False  # the capture's warm-up runs the passes
            last = graph.capture(chain)
            dst = self._handoff[0 if n % 2 else 1]  # pass n is odd: the odd graph reads the first's results

            def hand_off():
                _copy_into(tuple(dst[0]), tuple(last[0]))
                _copy_into(dst[1], last[1])
            handoff.capture(hand_off)
            entry = (graph, handoff)
        except Exception:  # noqa: BLE001 - not capturable here: the single-pass graphs
            entry = None
        self.chains[n] = entry
        while len(self.chains) > CHAIN_CACHE:
            self.chains.popitem(last=False)
        return entry

    def _capture_lookback(self, local, pool) -> None:
        h, h0 = self.h, self.h0
        from_0, from_1 = Graph(pool), Graph(pool)
        _, err0, _ = from_0.capture(lambda: local(h[0], h0, h0, out=h[1]))
        _, err1, _ = from_1.capture(lambda: local(h[1], h0, h0, out=h[0]))
        self.graphs = [from_0, from_1]
        self.residual = [err0.view(-1)[0], err1.view(-1)[0]]

    def _replay(self, k: int) -> None:
        """The graph that makes the residual of ``h^k`` (and ``h^{k+1}``) available."""
        g = self.graphs
        if len(g) == 3:  # pipelined: first pass, then odd / even iterations
            g[0 if k == 0 else (1 if k % 2 else 2)].replay()
        else:
            g[k % 2].replay()

    def run(self, xp, h0, initial_guess, stop_rule, phases):
        """Iterate from ``initial_guess`` (or zeros) until ``stop_rule.record(k, residual)`` says stop;
        returns ``(h, h0, k)``: a copy of the last iterate (whose residual was the last recorded).
        ``xp``: the projected inputs, or the inputs where this loop projects them."""
        first = min(self.expected + 1, stopping.HISTORY)  # passes queued first: the last solve's iterations + 1
        chain = self._chain(first) if self.state is not None else None  # (a capture: before the copy-in)
        if self.x is not None:  # the inputs (projected by a graph, or by the passes themselves)
            self.x.copy_(xp)
            if self.project is not None:
                self.project.replay()
        else:
            self.xp.copy_(xp)
        self.h0.copy_(h0)
        if initial_guess is not None:
            self.h[0].copy_(initial_guess)
            self.guess_zeroed = False
        elif not self.guess_zeroed:
            self.h[0].zero_()
        phases.mark("setup")
        if self.state is not None:
            return self._run_queued(h0, stop_rule, phases, first, chain)
        k = 0
        while True:
            self._replay(k)
            phases.mark("pass")
            res = float(self.residual[k % 2])  # one host sync per iteration, as the eager loops
            phases.mark("exchange")
            if stop_rule.record(k, res):
                return self.h[k % 2].clone(), h0, k
            k += 1

    def _settle_finite_check(self, opts, sums) -> None:
        """The solve's deferred NaN / Inf check of inputs, h0 and initial guess (``opts.first_sync_check``,
        a :class:`seqpar.validation.PendingFinite`), from the first graph's counts of NaN / Inf in their
        static copies (``sums``): no launch or read of its own.  Where this loop is given projected inputs
        (not the inputs), the check is left to run itself."""
        pending = opts.first_sync_check
        if isinstance(pending, PendingFinite) and self.checks_finite:
            opts.first_sync_check = None
            pending.settle(not any(sums))

    def _run_queued(self, h0, stop_rule, phases, first: int, chain=None):
        """The pipelined graphs with the stopping rule on the device (:mod:`seqpar.kernels.stopping`):
        queue ``first`` passes (as many iterations as the last solve took, plus its first pass), read the
        state once, replay its residuals through ``stop_rule`` (which must stop where the device did); queue
        ``QUEUE_MORE`` further iterations while it has not stopped.  ``chain``: :meth:`_chain` of ``first``
        passes (one launch for them), or None."""
        o = stop_rule.opts
        if (o.tol, o.max_iter, o.patience) != self.state_options:
            self.state_options = (o.tol, o.max_iter, o.patience)
            self.state_start.copy_(stopping.initial_values(*self.state_options))
        queued = read = 0
        count = first
        h = self.h
        out = torch.empty_like(h[0])
        self.guess_zeroed = False
        while True:
            if chain is not None and queued == 0:
                chain[0].replay()
            else:
                if chain is not None and queued == first:  # past the chain: its results where the next reads them
                    chain[1].replay()
                for k in range(queued, queued + count):
                    self._replay(k)
            queued += count
            count = min(QUEUE_MORE, stopping.HISTORY)
            phases.mark("pass")
            # the state's read is queued before the result's copy (stopping.take_final: a no-op unless the device
            # stopped; then h[0] is zeroed for the next solve), so the host reads while the copy runs
            self.host_readback.copy_(self.readback, non_blocking=True)
            if self.read_event is not None:
                self.read_event.record()
            stopping.take_final(self.state, h[0], h[1], out, zero_even=True)
            if self.read_event is not None:
                self.read_event.synchronize()  # one host sync per queue
            values = self.host_readback.tolist()
            phases.mark("exchange")
            self._settle_finite_check(stop_rule.opts, values[self.state.numel():])
            stop = False
            for res in stopping.recorded(values, read):
                stop = stop_rule.record(read, res)
                read += 1
                if stop:
                    break
            if stop != bool(values[stopping.STOPPED]) or read != int(values[stopping.ITER]):
                raise RuntimeError(f"seqpar.graphs: the device's stopping decision (stopped={values[0]}, "
                                   f"{int(values[1])} iterates) differs from the host's ({stop}, {read}); "
                                   f"set SEQPAR_CUDA_GRAPHS=0 and report this")
            if not stop and read != queued:  # every queued pass records its iterate until the rule stops: never
                raise RuntimeError(f"seqpar.graphs: the device recorded {read} iterates of {queued} queued passes "
                                   f"without stopping; set SEQPAR_CUDA_GRAPHS=0 and report this")  # (loop, not hang)
            if stop:
                k = read - 1
                self.expected = k
                self.guess_zeroed = True
                return out, h0, k
