"""The sharded solve of ``seqpar-solve`` as a Ray job (Ray Train ``TorchTrainer``): ``seqpar-ray-solve``.

    seqpar-ray-solve --num-workers 2 --seq-len 1M --hidden 4 --device cpu
    seqpar-ray-solve --num-workers 8 --use-gpu --seq-len 100M
    (from a checkout without installing: python launch/ray_solve.py ...)

Connects to the cluster named by ``RAY_ADDRESS`` (the repository is shipped
as the job's working_dir), or starts a local Ray instance.  Ray Train starts
one worker per rank and initialises torch.distributed (NCCL with
``--use-gpu``, gloo otherwise) with ``--timeout`` as collective timeout;
every worker then runs exactly the job of seqpar-solve (same options,
same numbers).  Rank 0's summary comes back to the driver, which prints it
(and writes ``--json``).  Command-line mistakes are reported before Ray starts
(exit status 2).  A worker that raises fails the whole run: the driver exits
non-zero.
"""
from __future__ import annotations

import json
import os
import sys
import time

from seqpar.cli import solve as job

# the directory holding the seqpar package (a checkout's root): workers import seqpar from there
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser(prog=None):
    p = job.build_parser(prog=prog)
    p.description = __doc__
    p.add_argument("--num-workers", type=job.positive_int, default=2, help="ranks (Ray Train workers), default 2")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--job-timeout", type=float, default=0.0,
                   help="seconds before the driver gives up on the whole run (0: no limit)")
    return p


def parse_args(argv=None, prog=None):
    parser = build_parser(prog=prog)
    args = parser.parse_args(argv)
    errors = []
    if args.use_gpu and (args.device or "cuda") != "cuda":
        errors.append("argument --use-gpu: runs on cuda; drop --device " + args.device)
    if not args.use_gpu and (args.device or "cpu").startswith("cuda"):
        errors.append(f"argument --device: {args.device} on Ray needs --use-gpu (one GPU per worker)")
    if args.backend not in ("auto", "nccl", "gloo"):
        errors.append("argument --backend: this launcher uses torch.distributed: auto, nccl or gloo")
    if not args.cpus_per_worker > 0:
        errors.append(f"argument --cpus-per-worker: must be > 0; got {args.cpus_per_worker}")
    if args.job_timeout < 0:
        errors.append(f"argument --job-timeout: must be >= 0; got {args.job_timeout}")
    if errors:
        parser.errors(errors)
    # the GPUs are the workers' (on a cluster the driver may have none): no device check here
    job.check_args(parser, args, args.num_workers, check_device=False)
    args.command_line = [os.path.basename(sys.argv[0]) or "seqpar-ray-solve"] + list(
        sys.argv[1:] if argv is None else argv)
    return args


def _worker_loop(config):
    """Runs on every Ray Train worker: torch.distributed is already initialised."""
    import os
    import sys

    root = config["pkg_parent"]
    if not os.path.isdir(os.path.join(root, "seqpar")):  # on a remote cluster the repo is the job's working_dir
        root = os.getcwd()
    sys.path.insert(0, root)
    import ray.train.torch
    import torch.distributed as dist

    from seqpar import distributed as sd
    from seqpar.cli import ray_solve
    from seqpar.cli import solve as job

    args = ray_solve.build_parser().parse_args(config["argv"])
    args.json = None  # the driver writes it (workers may be on other machines)
    args.command_line = config["command_line"]
    device = str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"
    ctx = sd.init_from_env("auto", device, args.timeout)
    job._set_threads(ctx)
    summary = job.run(args, ctx, print_summary=False)  # the driver prints it, once
    if dist.get_rank() == 0:
        config["results"].put(summary)


def main(argv=None):
    args = parse_args(argv)
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
        ray.init(address=address, runtime_env={"working_dir": PKG_PARENT,
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
        train_loop_config={"argv": argv, "use_gpu": args.use_gpu, "pkg_parent": PKG_PARENT, "results": results,
                           "command_line": args.command_line},
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
        print("ray_solve " + job.summary_line(summary) + f" (job incl. Ray start {summary['total_time_s']:.1f} s)",
              flush=True)
        if summary.get("fallback"):
            print(f"  fallback={summary['fallback']}: {summary['fallback_steps']:,} steps repaired", flush=True)
        if "speedup_vs_sequential" in summary:
            print(job.speedup_line(summary), flush=True)
        if "verify_ok" in summary:
            print("ray_solve " + job.verify_line(summary), flush=True)
        if args.out:
            print(f"the workers wrote their states files and manifest.json to {os.path.abspath(args.out)} "
                  f"(on their machines)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
            print(f"wrote the summary to {os.path.abspath(args.json)}", flush=True)
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
