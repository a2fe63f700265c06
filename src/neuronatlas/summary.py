"""The per-layer summary of an atlas as a plain-text table (``neuronatlas info``, ``profile``, ``demo``).

It sits below both the CLI and the demo, so neither borrows the other's printer.
"""

from __future__ import annotations


def print_summary(summary: dict) -> None:
    """Print ``Atlas.summary()``: model, corpus and token counts, then a per-layer table of neurons,
    activation rate, % dead (and % dead gate for gated families)."""
    print(f"model {summary['model']} ({summary['model_type']}), corpus {summary['corpus']}")
    print(f"{summary['tokens']:,} tokens in {summary['documents']:,} documents ({summary['windows']:,} windows)")
    print("tokens per label: " + ", ".join(f"{k} {v:,}" for k, v in summary["tokens_per_label"].items()))
    if "disk" in summary:
        disk = summary["disk"]
        largest = sorted(disk["files"].items(), key=lambda item: -item[1])[:4]
        print(f"on disk: {disk['bytes'] / 2**20:,.1f} MiB, {disk['bytes_per_neuron'] / 1024:.2f} KiB a neuron ("
              + ", ".join(f"{name} {size / 2**20:,.1f} MiB" for name, size in largest) + ")")
        sample_line = document_sample_line(summary)
        if sample_line:
            print(sample_line)
    gate = summary.get("gate_dead_fraction_per_layer")
    header = f"{'layer':>5} {'neurons':>8} {'active %':>9} {'dead %':>7}" + (f" {'gate dead %':>11}" if gate else "")
    print(header)
    rows = zip(summary["neurons_per_layer"], summary["activation_rate_per_layer"], summary["dead_fraction_per_layer"])
    for layer, (width, rate, dead) in enumerate(rows):
        line = f"{layer:>5} {width:>8} {100 * rate:>9.2f} {100 * dead:>7.2f}"
        if gate:
            line += f" {100 * gate[layer]:>11.2f}"
        print(line)


def document_sample_line(summary: dict, share: float = 0.25) -> str | None:
    """A line naming the document sample's bytes when they are more than ``share`` of the atlas: it
    grows with --doc-sample (documents a label; a byte a neuron each a pool), the rest does not."""
    disk = summary["disk"]
    sample = sum(size for name, size in disk["files"].items() if name.startswith("docpool_"))
    if not disk["bytes"] or sample <= share * disk["bytes"]:
        return None
    neurons = max(sum(summary["neurons_per_layer"]), 1)
    documents = max(summary.get("doc_sample_documents", 0), 1)
    return (f"  of which the document sample ({documents:,} documents, {sample / neurons / documents:.0f} bytes a "
            f"neuron each) {sample / neurons / 1024:.2f} KiB a neuron: a smaller --doc-sample N (documents per "
            "label) shrinks it, --doc-sample 0 drops it, and with it find's document-level scores and permutation nulls")
