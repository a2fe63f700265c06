"""Perplexity against sparsity for every sparse method and its random control, on a bundled model.

    python benchmarks/sparse_quality.py [--model tiny-llama] [--sparsities 0.25,0.5,0.75] [--windows 32]

Calibration as in tests/test_sparse_quality.py: an atlas of ``--train-docs`` training documents
(hot), a calibration pass over the same documents (TEAL, WINA), nothing (CoreInfer, MoE with 16
experts split by k-means of W_in rows, centroid router). Each plan is calibrated once and re-targeted
to every sparsity (for MoE the share of experts skipped). Held-out perplexity as in
``neuronatlas bench``: each window's second half after prefilling its first half. Prints one JSON
line per method and sparsity, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.loading import load_model
from neuronatlas.profile import ProfileOptions, profile
from neuronatlas.sparse import SparsifyOptions, sparsify
from neuronatlas.sparse.bench import eval_windows, perplexity
from neuronatlas.sparse.wrap import SparseModel

METHODS = ("teal", "wina", "hot", "coreinfer", "moe")


def training_slice(path: Path, documents: int) -> Path:
    """Every n-th training document, ``documents`` of them, all languages alike."""
    lines = bundled.CORPUS_TRAIN.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:: max(1, len(lines) // documents)][:documents]) + "\n", encoding="utf-8")
    return path


def curve(model, plan, windows, sparsities: list[float], dense: float) -> list[dict]:
    points = []
    for sparsity in sparsities:
        target = plan.at_sparsity(sparsity)
        torch.manual_seed(0)  # TEAL/WINA/MoE controls draw per token
        random = perplexity(model, windows, SparseModel(model, target.as_control("random")))
        points.append({"method": plan.method, "sparsity": sparsity, "ppl_dense": dense,
                       "ppl_sparse": perplexity(model, windows, SparseModel(model, target)), "ppl_random": random})
    return points


def table(points: list[dict], sparsities: list[float]) -> str:
    head = "| method | " + " | ".join(f"{s:.0%}: method / random" for s in sparsities) + " |"
    lines = [head, "|---|" + "---|" * len(sparsities)]
    for method in dict.fromkeys(p["method"] for p in points):
        row = {p["sparsity"]: p for p in points if p["method"] == method}
        cells = [f"×{row[s]['ppl_sparse'] / row[s]['ppl_dense']:.2f} / ×{row[s]['ppl_random'] / row[s]['ppl_dense']:.2f}"
                 for s in sparsities]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a bundled model name")
    parser.add_argument("--sparsities", default="0.25,0.5,0.75")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train-docs", type=int, default=80)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per window")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    model_dir = str(bundled.model_path(args.model))
    model, tokenizer = load_model(model_dir, device="cpu", quiet=True)
    windows = eval_windows(tokenizer, bundled.CORPUS_HELDOUT, max_windows=args.windows, max_length=args.max_length)
    dense = perplexity(model, windows)
    points = []
    with tempfile.TemporaryDirectory() as root:
        train = training_slice(Path(root) / "train.jsonl", args.train_docs)
        profile(model_dir, train, Path(root) / "atlas", label_field="lang", device="cpu", quiet=True,
                options=ProfileOptions(max_length=args.max_length, top_k=0, doc_sample=0, positions=False))
        atlas = load_atlas(Path(root) / "atlas")
        options = SparsifyOptions(calib_tokens=4096, max_length=args.max_length)
        for method in args.methods.split(","):
            plan = sparsify(method, model, tokenizer, sparsities[0], atlas=atlas if method == "hot" else None,
                            corpus=train if method in ("teal", "wina") else None, options=options)
            for point in curve(model, plan, windows, sparsities, dense):
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in point.items()}), flush=True)
                points.append(point)
    print(f"\n{args.model}, {len(windows)} held-out windows of <= {args.max_length} tokens, dense perplexity {dense:.2f}")
    print(table(points, sparsities))


if __name__ == "__main__":
    main()
