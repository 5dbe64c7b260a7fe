#!/usr/bin/env python
"""Turn the benchmark JSON files into PNG plots under benchmarks/results/.

    python benchmarks/plot.py [--results benchmarks/results]

Reads whichever of peers.json, training.json, convergence.json, scaling.json
exist and writes speedup_vs_T.png, training.png, convergence.png, scaling.png.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load(results, name):
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def subtitle(env):
    return f"{env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · {env.get('date', '')[:10]}"


def save(fig, env, out):
    """Every figure's ending: the environment subtitle, tight layout, PNG at 120 dpi, closed."""
    fig.suptitle(subtitle(env), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_peers(data, out):
    rows = data["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (peer, label) in zip(axes, [("speedup_vs_cudnn", "cuDNN nn.GRU"), ("speedup_vs_eager", "torch eager loop")]):
        series = defaultdict(list)
        for r in rows:
            if r.get(peer) and r["cell"] == "gru":
                series[(r["D"], r["jacobian"])].append((r["T"], r[peer]))
        for (D, jac), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"D={D} ({jac})")
        ax.axhline(1, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("sequence length T"), ax.set_title(f"seqpar GRU speedup over {label}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup (×)")
    axes[1].legend(fontsize=7, ncol=2)
    save(fig, data["env"], out)


def plot_training(data, out):
    rows = data["rows"]
    dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    for ax, D in zip(axes[0], dims):
        series = defaultdict(list)
        for r in rows:
            if r["D"] == D:
                series[r["model"]].append((r["T"], r["fwd_bwd_s"], r["extrapolated"]))
        for model, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model,
                    ls="--" if any(p[2] for p in pts) else "-")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("T"), ax.set_ylabel("forward + backward (s)")
        ax.set_title(f"training step, D={D} (dashed: cuDNN extrapolated)")
        ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=8)
    save(fig, data["env"], out)


def plot_convergence(data, out):
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    series = defaultdict(list)
    for r in rows:
        series[(r["regime"], r["cell"], r["jacobian"])].append((r["T"], r["iterations"], r["newton_converged"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" / ".join(key))
        for T, it, ok in pts:
            if not ok:
                ax.plot(T, it, marker="x", color="red", ms=10)
    ax.set_xscale("log")
    ax.set_xlabel("T"), ax.set_ylabel("Newton iterations")
    ax.set_title("iterations to converge (red x: Newton failed, exact fallback used)")
    ax.grid(True, alpha=0.3), ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, data["env"], out)


def plot_scaling(data, out):
    """Left: solve / training-step time on 1 and P GPUs per configuration (same machine, same call).
    Right: the P-GPU speed-up (weak scaling: 1-GPU time over P-GPU time at equal steps per rank)."""
    rows = [r for r in data["rows"] if r.get("kind") in ("strong", "weak", "train")]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    sizes = sorted({r["world_size"] for r in rows})
    t = {(r["label"], r["world_size"]): r["solve_s"] for r in rows}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(sizes))
    for i, P in enumerate(sizes):
        xs = [k + i * width for k in range(len(labels))]
        ax.bar(xs, [t.get((lab, P), 0) * 1e3 for lab in labels], width, label=f"{P} GPU{'s' if P > 1 else ''}")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(labels))], labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("time (ms), median after warm-up"), ax.legend(), ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("solve (training step for 'train') time")
    for P in sizes[1:]:
        sp = [t[(lab, 1)] / t[(lab, P)] if (lab, 1) in t and (lab, P) in t else 0 for lab in labels]
        ax2.bar(range(len(labels)), sp, label=f"{P} GPUs vs 1")
        for k, v in enumerate(sp):
            ax2.text(k, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax2.set_ylabel("speed-up (weak: 1-GPU time / P-GPU time)"), ax2.grid(True, axis="y", alpha=0.3)
    ax2.set_title("scaling"), ax2.legend()
    save(fig, data["env"], out)


def plot_odeint(data, out):
    """Forward and training-step time against grid length, seqpar vs torchdiffeq (extrapolated points hollow)."""
    rows = [r for r in data["rows"] if r.get("D") == 16]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ["fwd", "train"]):
        series = defaultdict(list)
        for r in rows:
            if r.get(f"{kind}_s"):
                series[r["solver"]].append((r["T"], r[f"{kind}_s"], r.get(f"{kind}_extrapolated", False)))
        for solver, pts in sorted(series.items()):
            pts.sort()
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=solver)
            for T, v, ex in pts:
                ax.plot(T, v, "o", color=line.get_color(), mfc="none" if ex else line.get_color())
        ax.set_xscale("log"), ax.set_yscale("log"), ax.grid(True, alpha=0.3), ax.legend(fontsize=8)
        ax.set_xlabel("grid steps T (rk4)"), ax.set_ylabel("seconds")
        ax.set_title(f"neural ODE D=16 B=16: {'forward' if kind == 'fwd' else 'training step'} (hollow: extrapolated)")
    save(fig, data["env"], out)


def plot_vs_deer(data, out):
    """Solve time against state size D at each T: seqpar dense / diag, DEER, lax.scan, cuDNN (B=16);
    run 45 (vs_deer.json: D = 1, 4; quasi-Newton at D = 16, 64, T = 1M) with the D = 16 rows of run 33 (vs_deer_run33.json), the lax.scan
    column and the D=64 rows of run 26 / 27 (vs_deer_run26.json, vs_deer_d64_*.json), merged by main."""
    rows = [r for r in data["rows"] if r.get("B") == 16]
    Ts = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(Ts), figsize=(6 * len(Ts), 4.5), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        series = defaultdict(dict)
        for r in rows:
            if r["T"] != T:
                continue
            if r.get("seqpar_ms"):
                series[f"seqpar {r['jacobian']}"][r["D"]] = r["seqpar_ms"]
            for key, name in (("deer_ms", "DEER"), ("sequential_ms", "JAX lax.scan"), ("cudnn_ms", "cuDNN nn.GRU")):
                if r.get(key):
                    series[name][r["D"]] = r[key]
        for name, pts in sorted(series.items()):
            ds = sorted(pts)
            ax.plot(ds, [pts[d] for d in ds], "o-", label=name)
        ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.grid(True, alpha=0.3), ax.legend(fontsize=8)
        ax.set_xlabel("state size D"), ax.set_ylabel("ms per solve")
        ax.set_title(f"GRU B=16, T={T:,} (missing DEER points: out of memory)")
    save(fig, data["env"], out)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args()
    for name, fn, png in [("peers.json", plot_peers, "speedup_vs_T.png"), ("training.json", plot_training, "training.png"),
                          ("convergence.json", plot_convergence, "convergence.png"),
                          ("scaling.json", plot_scaling, "scaling.png"), ("odeint.json", plot_odeint, "odeint.png"),
                          ("vs_deer.json", plot_vs_deer, "vs_deer.png")]:
        data = load(a.results, name)
        if name == "peers.json" and data:  # later runs at some shapes (peers_*.json) replace those rows
            for extra in sorted(f for f in os.listdir(a.results) if f.startswith("peers_") and f.endswith(".json")):
                newer = load(a.results, extra)["rows"]
                keys = {(r["D"], r["T"], r["B"], r["cell"], r["jacobian"]) for r in newer}
                data["rows"] = [r for r in data["rows"] if (r["D"], r["T"], r["B"], r["cell"], r["jacobian"]) not in keys]
                data["rows"] += newer
        if name == "vs_deer.json" and data:  # earlier runs fill what run 37 did not rerun (D=16, lax.scan, D=64)
            key = lambda r: (r["D"], r["T"], r["B"], r["jacobian"])  # noqa: E731
            for earlier in ("vs_deer_run33.json", "vs_deer_run26.json"):
                have = {key(r): r for r in data["rows"]}
                for r in (load(a.results, earlier) or {}).get("rows", []):
                    if key(r) not in have:
                        data["rows"].append(r)
                    elif r.get("sequential_ms") and not have[key(r)].get("sequential_ms"):
                        have[key(r)]["sequential_ms"] = r["sequential_ms"]
            # later runs (vs_deer_d64_*.json) fill the rows they measured
            for extra in sorted(f for f in os.listdir(a.results) if f.startswith("vs_deer_d64_") and f.endswith(".json")):
                for r in load(a.results, extra)["rows"]:
                    for row in data["rows"]:
                        if (row["D"], row["T"], row["B"], row["jacobian"]) == (r["D"], r["T"], r["B"], r["jacobian"]) \
                                and r.get("seqpar_ms") and not row.get("seqpar_ms"):
                            row["seqpar_ms"] = r["seqpar_ms"]
        if data and data.get("rows"):
            fn(data, os.path.join(a.results, png))
            print(f"wrote {os.path.join(a.results, png)}")


if __name__ == "__main__":
    main()
