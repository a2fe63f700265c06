"""Time ``find_lape`` on a synthetic Llama-3-8B-sized atlas: 32 layers x 14336 neurons, 20 labels.

    python benchmarks/find_lape.py [--layers 32] [--width 14336] [--labels 20] [--repeat 3]

The atlas is built in memory the way ``profile`` lays it out (``atlas.new_signals`` on a meta dict
like the one ``profile`` writes), with random activation counts in the gate signal; only LAPE's
work is timed, not the construction. The target is < 5 s.
"""

from __future__ import annotations

import argparse
import time

import torch

from neuronatlas.atlas import Atlas, new_signals
from neuronatlas.methods.lape import find_lape


def synthetic_atlas(layers: int, width: int, labels: int, tokens: int = 100_000, seed: int = 0) -> Atlas:
    names = [f"lang{k:02d}" for k in range(labels)]
    meta = {
        "format_version": 1,
        "model": {"name_or_path": "synthetic", "model_type": "llama", "fingerprint": "0" * 16,
                  "num_layers": layers, "widths": [width] * layers, "gated": True},
        "tokenizer": {"name_or_path": "synthetic", "vocab_size": 128256},
        "corpus": {"path": "synthetic"},
        "labels": names,
        "documents": labels * 100,
        "windows": labels * 200,
        "tokens": tokens * labels,
        # one histogram edge and no exemplars keep the unused tensors small
        "options": {"threshold": 0.0, "top_k": 0, "hist_edges": [0.0], "gate": True},
    }
    signals = new_signals(meta)
    generator = torch.Generator().manual_seed(seed)
    rate = torch.rand(labels, 1, generator=generator) * 0.2 + 0.3  # a base activation rate per label
    for layer in range(layers):
        p = (rate + 0.2 * torch.rand(labels, width, generator=generator)).clamp(0, 1)
        specific = torch.randint(0, labels, (width,), generator=generator)  # ~1% label-specific neurons
        chosen = torch.rand(width, generator=generator) < 0.01
        p[:, chosen] *= 0.05
        p[specific[chosen], chosen.nonzero().flatten()] = 0.9
        for name in ("z", "gate"):
            signals[name].tensors[f"active.{layer}"] = torch.binomial(torch.full_like(p, tokens), p, generator=generator).long()
    return Atlas(meta, signals, torch.full((labels,), tokens, dtype=torch.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=14336)
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    atlas = synthetic_atlas(args.layers, args.width, args.labels)
    print(f"built a {args.layers} x {args.width} atlas with {args.labels} labels "
          f"({args.layers * args.width * args.labels / 1e6:.1f}M probabilities) in {time.perf_counter() - start:.1f} s")
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        found = find_lape(atlas)
        times.append(time.perf_counter() - start)
    per_label = {label: sum(n.label == label for n in found.neurons) for label in atlas.labels}
    print(f"find_lape: {found.params['kept']} neurons kept of {found.params['total_neurons']}, "
          f"tau {found.params['tau']:.4f}, {min(per_label.values())}-{max(per_label.values())} per label")
    print(f"seconds: best {min(times):.2f}, runs " + ", ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
