"""FFN-only speed of the sparse layouts against dense, on a Llama-shaped FFN (batch 1, one token).

    python benchmarks/sparse_kernels.py [--hidden 2048] [--ffn 5632] [--layers 4] [--threads 2]

Several layers' weights are cycled so the L3 cache cannot hold them; dense and each layout
alternate, and the medians are compared. Prints one JSON line per layout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from neuronatlas.sparse.kernels import compact_columns, compact_rows, expert_runs, sparse_input_matvec, weighted_row_sums


def ffn_dense(x, w):
    return F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])


def build(hidden: int, ffn: int, layers: int, sparsity: float, experts: int):
    keep = ffn - int(sparsity * ffn)
    out = []
    for _ in range(layers):
        w = {name: torch.randn(shape) / 50 for name, shape in
             (("gate", (ffn, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn)))}
        kept = torch.randperm(ffn)[:keep].sort().values
        w["compact"] = {"gate": compact_rows(w["gate"], kept), "up": compact_rows(w["up"], kept),
                        "down": compact_columns(w["down"], kept)}
        w["gate_up_t"] = torch.cat([w["gate"].T, w["up"].T]).contiguous()  # (2 hidden, ffn): rows per input channel
        w["down_t"] = w["down"].T.contiguous()  # (ffn, hidden): expert rows / neuron rows contiguous
        out.append(w)
    bounds = torch.linspace(0, ffn, experts + 1).long().tolist()
    return out, bounds


def per_token(x, w, threshold_x, threshold_z, pieces=None):
    """TEAL's decode step: one bag call for gate and up (shared x mask), one for down (mask of z)."""
    xv = x[0]
    kept = (xv.abs() > threshold_x).nonzero().squeeze(1)
    gate, up = weighted_row_sums(w["gate_up_t"], [kept, kept + xv.numel()], [xv[kept]] * 2, pieces)
    z = F.silu(gate) * up
    return sparse_input_matvec(z, w["down_t"], z.abs() > threshold_z, pieces)


def experts_ffn(x, w, runs):
    z = torch.cat([F.silu(F.linear(x, w["gate"][a:b])) * F.linear(x, w["up"][a:b]) for a, b in runs], -1)
    out, start = 0, 0
    for a, b in runs:
        out = out + z[:, start : start + b - a] @ w["down_t"][a:b]
        start += b - a
    return out


def index_select_ffn(x, w, kept):
    gate, up = w["gate"].index_select(0, kept), w["up"].index_select(0, kept)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), w["down"].index_select(1, kept))


def median_time(fn, layers, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for w in layers:
            fn(w)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers, bounds = build(args.hidden, args.ffn, args.layers, 0.5, 16)
    x = torch.randn(1, args.hidden)
    # |x| median and the |z| median of a Gaussian-like input: per-token masks near 50%
    threshold_x = float(x.abs().median())
    z = F.silu(F.linear(x, layers[0]["gate"])) * F.linear(x, layers[0]["up"])
    threshold_z = float(z.abs().median())
    kept = torch.randperm(args.ffn)[: args.ffn // 2].sort().values
    quarter = expert_runs([0, 5, 9, 13], bounds)  # 4 of 16 experts
    layouts = {
        "compacted fixed mask 50%": lambda w: ffn_dense(x, w["compact"]),
        "4 of 16 expert slices (25%)": lambda w: experts_ffn(x, w, quarter),
        "per-token embedding_bag 50%, a bag per thread (TEAL/WINA)": lambda w: per_token(x, w, threshold_x, threshold_z),
        "per-token embedding_bag 50%, one bag": lambda w: per_token(x, w, threshold_x, threshold_z, pieces=1),
        "per-token index_select 50%": lambda w: index_select_ffn(x, w, kept),
    }
    with torch.inference_mode():
        for name, fn in layouts.items():
            ratios = []
            for _ in range(args.rounds):
                dense = median_time(lambda w: ffn_dense(x, w), layers, args.repeats)
                sparse = median_time(fn, layers, args.repeats)
                ratios.append(dense / sparse)
            print(json.dumps({"layout": name, "speedup_vs_dense": round(statistics.median(ratios), 3),
                              "rounds": [round(r, 3) for r in ratios], "threads": args.threads,
                              "shape": [args.hidden, args.ffn]}))


if __name__ == "__main__":
    main()
