#!/usr/bin/env python
"""The sharded solve of launch/solve.py as a Ray job (Ray Train ``TorchTrainer``).

    python launch/ray_solve.py --num-workers 2 --seq-len 1M --hidden 4 --device cpu
    python launch/ray_solve.py --num-workers 8 --use-gpu --seq-len 100M

Connects to the cluster named by ``RAY_ADDRESS`` (the repository is shipped
as the job's working_dir), or starts a local Ray instance.  Ray Train starts
one worker per rank and initialises torch.distributed (NCCL with
``--use-gpu``, gloo otherwise) with ``--timeout`` as collective timeout;
every worker then runs exactly the job of launch/solve.py (same options,
same numbers).  Rank 0's summary comes back to the driver, which prints it
(and writes ``--json``).  A worker that raises fails the whole run: the
driver exits non-zero.
"""
from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)


def build_parser():
    import solve as job

    p = job.build_parser(prog="ray_solve.py")
    p.description = __doc__
    p.add_argument("--num-workers", type=int, default=2, help="ranks (Ray Train workers), default 2")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--job-timeout", type=float, default=0.0,
                   help="seconds before the driver gives up on the whole run (0: no limit)")
    return p


def _worker_loop(config):
    """Runs on every Ray Train worker: torch.distributed is already initialised."""
    import os
    import sys

    launch_dir = config["launch_dir"]
    if not os.path.isdir(launch_dir):  # on a remote cluster the repo is the job's working_dir
        launch_dir = os.path.join(os.getcwd(), "launch")
        sys.path.insert(0, os.getcwd())
    sys.path.insert(0, launch_dir)
    import ray.train.torch
    import torch.distributed as dist

    import ray_solve
    import solve as job
    from seqpar import distributed as sd

    args = ray_solve.build_parser().parse_args(config["argv"])
    args.json = None  # the driver writes it (workers may be on other machines)
    device = str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"
    ctx = sd.init_from_env("auto", device, args.timeout)
    job._set_threads(ctx)
    summary = job.run(args, ctx)
    if dist.get_rank() == 0:
        config["results"].put(summary)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num-workers must be >= 1")
    if args.use_gpu and (args.device or "cuda") != "cuda":
        parser.error("--use-gpu runs on cuda; drop --device cpu")
    if args.backend not in ("auto", "nccl", "gloo"):
        parser.error("ray_solve.py uses torch.distributed: --backend auto, nccl or gloo")
    backend = args.backend if args.backend != "auto" else ("nccl" if args.use_gpu else "gloo")

    argv = list(sys.argv[1:] if argv is None else argv)

    if args.job_timeout > 0:
        import threading

        def _expire():
            print(f"ray_solve: the run did not finish within --job-timeout {args.job_timeout:.0f} s; giving up",
                  file=sys.stderr, flush=True)
            os._exit(1)

        timer = threading.Timer(args.job_timeout, _expire)
        timer.daemon = True
        timer.start()

    t0 = time.perf_counter()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"working_dir": REPO,
                                               "excludes": [".git", "*.npy", "*.safetensors", "benchmarks/results"]})
    else:
        need = int(args.num_workers * args.cpus_per_worker) + 1
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)
    print(f"ray_solve: Ray {'at ' + address if address else 'local instance'} up in "
          f"{time.perf_counter() - t0:.1f} s; {args.num_workers} workers, backend {backend}", flush=True)

    results = Queue(maxsize=1)
    res = {"CPU": args.cpus_per_worker}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"argv": argv, "use_gpu": args.use_gpu, "launch_dir": HERE, "results": results},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker=res),
        torch_config=TorchConfig(backend=backend, timeout_s=int(max(1, args.timeout))),
        run_config=RunConfig(name=f"seqpar-solve-{int(time.time())}", failure_config=FailureConfig(max_failures=0),
                             storage_path=os.environ.get("SEQPAR_RAY_STORAGE", "/tmp/seqpar_ray_results")),
    )
    rc = 1
    try:
        trainer.fit()
        summary = results.get(timeout=30)
        summary["launcher"] = "ray"
        summary["total_time_s"] = time.perf_counter() - t0
        mem = ", ".join(f"{b / 2**20:.0f} MiB" for b in summary["peak_memory_bytes_per_rank"])
        print(f"ray_solve summary: world_size={summary['world_size']} backend={summary['backend']} "
              f"T={summary['seq_len']:,} iterations={summary['iterations']} converged={summary['converged']} "
              f"residual={summary['residual']:.3e} wall_time={summary['wall_time_s']:.3f}s "
              f"steps/s={summary['steps_per_s']:.4g} peak_memory/rank=[{mem}] "
              f"(job incl. Ray start {summary['total_time_s']:.1f} s)", flush=True)
        if "verify_ok" in summary:
            print(f"ray_solve verify: window {summary['verify_window']} rel error {summary['verify_rel_error']:.3e} "
                  f"-> {'OK' if summary['verify_ok'] else 'FAILED'}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        rc = 0 if summary["converged"] and summary.get("verify_ok", True) else 1
    except Exception as e:  # noqa: BLE001 - TrainingFailedError etc.: report and exit non-zero
        print(f"ray_solve: the run failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
    return rc


if __name__ == "__main__":
    sys.exit(main())
