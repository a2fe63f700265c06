"""Time the viewer's neuron page and neuron API on a synthetic atlas of 500k neurons x 20 exemplars.

    python benchmarks/viewer_neuron_page.py [--layers 35] [--width 14336] [--top-k 20] [--samples 50]
                                            [--row-group 16384] [--out DIR] [--keep]

The atlas is written in the atlas format (atlas.json, stats.safetensors, exemplars.parquet with
activation windows, contexts.parquet, vocab.parquet) as ``Atlas.save`` lays it out: exemplars
sorted by (layer, neuron, rank) in row groups of 16,384 rows (``--row-group 1048576`` measures
pyarrow's default instead). Its model does not exist, so pages show "could not be loaded" where
the vocabulary projection would be: the time measured is the atlas's part of a page. The target
is a neuron page in < 150 ms at the 95th percentile.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from neuronatlas.atlas import Atlas, new_signals
from neuronatlas.stats import default_hist_edges, make_uid

DEFAULT_ROW_GROUP = 16_384  # rows per row group of exemplars.parquet as Atlas.save writes it (pyarrow's default: 1 << 20)


def synthetic_meta(layers: int, width: int, labels: int, top_k: int, windows: int, window_length: int) -> dict:
    names = [f"lang{k}" for k in range(labels)]
    return {
        "format_version": 1, "package_version": "benchmark",
        "model": {"name_or_path": "/nonexistent/synthetic-model", "model_type": "llama", "fingerprint": "0" * 16,
                  "num_layers": layers, "widths": [width] * layers, "gated": False},
        "tokenizer": {"name_or_path": "synthetic", "vocab_size": 50_000},
        "corpus": {"path": "synthetic"}, "labels": names, "documents": windows, "windows": windows,
        "tokens": windows * window_length,
        "tokens_per_label": {name: windows * window_length // labels for name in names},
        "options": {"threshold": 0.0, "top_k": top_k, "hist_edges": default_hist_edges().tolist(), "gate": False,
                    "max_length": window_length, "positions": False, "doc_sample": 0, "exemplar_radius": 16},
    }


def write_stats(meta: dict, path: Path, rng: np.random.Generator) -> None:
    """stats.safetensors with plausible per-label counts and moments, histograms and top-k."""
    signals = new_signals(meta)
    labels, top_k = len(meta["labels"]), meta["options"]["top_k"]
    tokens = meta["tokens"] // labels
    for layer, width in enumerate(meta["model"]["widths"]):
        t = signals["z"].tensors
        t[f"active.{layer}"] = torch.from_numpy(rng.integers(0, tokens, (labels, width)))
        t[f"sum.{layer}"] = torch.from_numpy(rng.normal(0, 100, (labels, width)))
        t[f"sumsq.{layer}"] = torch.from_numpy(rng.uniform(1e3, 1e4, (labels, width)))
        t[f"min.{layer}"] = torch.from_numpy(rng.uniform(-5, 0, (labels, width)).astype(np.float32))
        t[f"max.{layer}"] = torch.from_numpy(rng.uniform(1, 20, (labels, width)).astype(np.float32))
        t[f"hist.{layer}"] = torch.from_numpy(rng.integers(0, 5000, (width, 64)))
        t[f"top_values.{layer}"] = torch.from_numpy(-np.sort(-rng.uniform(1, 20, (width, top_k)), 1).astype(np.float32))
        t[f"top_uid.{layer}"] = make_uid(torch.from_numpy(rng.integers(0, meta["windows"], (width, top_k))),
                                         torch.from_numpy(rng.integers(0, meta["options"]["max_length"], (width, top_k))))
    atlas = Atlas(meta, signals, torch.full((labels,), tokens, dtype=torch.int64))
    save_file(atlas.tensors(), str(path))


def exemplar_layer(layer: int, width: int, top_k: int, windows: int, window_length: int, radius: int,
                   rng: np.random.Generator) -> pa.Table:
    """One layer's exemplar rows with activation windows clipped to the window, as profile writes them."""
    rows = width * top_k
    pos = rng.integers(0, window_length, rows).astype(np.int32)
    start = np.maximum(pos - radius, 0).astype(np.int32)
    stop = np.minimum(pos + radius + 1, window_length)
    lengths = (stop - start).astype(np.int32)
    values = rng.normal(0, 1, int(lengths.sum())).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    activation = -np.sort(-rng.uniform(1, 20, (width, top_k)), 1).astype(np.float32).reshape(-1)
    values[offsets[:-1] + (pos - start)] = activation  # the exemplar token's own value
    seq = rng.integers(0, windows, rows)
    scale = (np.maximum.reduceat(np.abs(values), offsets[:-1]) / 127).astype(np.float32)  # as exemplar_windows stores them
    codes = np.rint(values / np.repeat(scale, lengths)).clip(-127, 127).astype(np.int8)
    return pa.table({
        "layer": pa.array(np.full(rows, layer, np.int32)),
        "neuron": pa.array(np.repeat(np.arange(width, dtype=np.int32), top_k)),
        "rank": pa.array(np.tile(np.arange(top_k, dtype=np.int16), width)),
        "activation": pa.array(activation),
        "seq": pa.array(seq.astype(np.int64)),
        "pos": pa.array(pos),
        "doc": pa.array(seq.astype(np.int64)),
        "label": pa.array([f"lang{s % 5}" for s in seq.tolist()], pa.string()),
        "window_start": pa.array(start),
        "window_scale": pa.array(scale),
        "window_codes": pa.ListArray.from_arrays(pa.array(offsets), pa.array(codes, pa.int8())),
    })


def write_exemplars(meta: dict, path: Path, radius: int, row_group: int, rng: np.random.Generator) -> int:
    """exemplars.parquet in row groups of ``row_group`` rows, layer by layer (bounded memory)."""
    options, widths = meta["options"], meta["model"]["widths"]
    pending: list[pa.Table] = []
    written = 0
    writer = None
    for layer, width in enumerate(widths):
        pending.append(exemplar_layer(layer, width, options["top_k"], meta["windows"], options["max_length"], radius, rng))
        table = pa.concat_tables(pending)
        writer = writer or pq.ParquetWriter(path, table.schema)
        full = table.num_rows // row_group * row_group if layer < len(widths) - 1 else table.num_rows
        for begin in range(0, full, row_group):
            writer.write_table(table.slice(begin, min(row_group, full - begin)), row_group_size=row_group)
        written += full
        pending = [table.slice(full)]
    writer.close()
    return written


def write_contexts(meta: dict, folder: Path, rng: np.random.Generator) -> None:
    windows, length = meta["windows"], meta["options"]["max_length"]
    ids = rng.integers(0, 50_000, windows * length).astype(np.int32)
    offsets = np.arange(0, windows * length + 1, length, dtype=np.int32)
    pq.write_table(pa.table({
        "seq": pa.array(np.arange(windows, dtype=np.int64)),
        "doc": pa.array(np.arange(windows, dtype=np.int64)),
        "label": pa.array([f"lang{s % 5}" for s in range(windows)], pa.string()),
        "start": pa.array(np.zeros(windows, np.int64)),
        "token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
    }), folder / "contexts.parquet")
    pq.write_table(pa.table({"id": pa.array(np.arange(50_000, dtype=np.int32)),
                             "token": pa.array([f" tok{i}" for i in range(50_000)])}), folder / "vocab.parquet")


def build(folder: Path, args) -> None:
    rng = np.random.default_rng(0)
    meta = synthetic_meta(args.layers, args.width, 5, args.top_k, args.windows, args.window_length)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "atlas.json").write_text(json.dumps(meta))
    write_stats(meta, folder / "stats.safetensors", rng)
    rows = write_exemplars(meta, folder / "exemplars.parquet", 16, args.row_group, rng)
    write_contexts(meta, folder, rng)
    size = sum(item.stat().st_size for item in folder.iterdir()) / 2**20
    print(f"atlas: {args.layers} x {args.width} = {args.layers * args.width:,} neurons, {rows:,} exemplars "
          f"in row groups of {args.row_group:,}, {size:,.0f} MiB")


def timed(call, samples: list) -> list[float]:
    times = []
    for item in samples:
        started = time.perf_counter()
        call(item)
        times.append(1000 * (time.perf_counter() - started))
    return times


def report(name: str, times: list[float]) -> None:
    times = sorted(times)
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
    print(f"{name:<22} median {statistics.median(times):7.1f} ms   p95 {p95:7.1f} ms   max {times[-1]:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=35)
    parser.add_argument("--width", type=int, default=14336)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--windows", type=int, default=50_000, help="context windows in contexts.parquet")
    parser.add_argument("--window-length", type=int, default=256)
    parser.add_argument("--row-group", type=int, default=DEFAULT_ROW_GROUP, help="rows per row group of exemplars.parquet")
    parser.add_argument("--samples", type=int, default=50, help="random neurons timed")
    parser.add_argument("--out", default=None, help="where to write the atlas (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the atlas afterwards")
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="viewer-bench-")) / "atlas"
    try:
        if not (folder / "atlas.json").exists():
            started = time.perf_counter()
            build(folder, args)
            print(f"written in {time.perf_counter() - started:.0f} s to {folder}")
        started = time.perf_counter()
        viewer = open_viewer(folder)
        client = TestClient(create_app(viewer.data, viewer.model))
        print(f"start-up (open the atlas): {time.perf_counter() - started:.1f} s")
        rng = np.random.default_rng(1)
        neurons = [(int(rng.integers(args.layers)), int(rng.integers(args.width))) for _ in range(args.samples)]
        client.get("/neuron/0/0")  # the first request also finds out that the model is not there
        pages = timed(lambda n: client.get(f"/neuron/{n[0]}/{n[1]}").raise_for_status(), neurons)
        api = timed(lambda n: client.get(f"/api/neuron/{n[0]}/{n[1]}").raise_for_status(), neurons)
        query = timed(lambda n: viewer.data.exemplars(*n), neurons)
        report("neuron page (HTML)", pages)
        report("neuron API (JSON)", api)
        report("exemplar query only", query)
        exemplars = len(viewer.data.exemplars(*neurons[0]))
        print(f"{exemplars} exemplars per neuron; target: neuron page p95 < 150 ms")
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
