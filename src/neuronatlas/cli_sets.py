"""Command line: write a neuron set and print what it holds (shared by every `find` method)."""

from __future__ import annotations

from collections import Counter


def write_set(found, out: str, extra: str = "") -> None:
    """Save ``found`` to ``out``, then print its summary and where it went."""
    found.save(out)
    print_set_summary(found, extra)
    print(f"neuron set written to {out}")


def print_set_summary(found, extra: str = "") -> None:
    """One line of totals, then neurons per label (when labelled) and per layer."""
    widths = found.model.get("widths") or []
    unique = {(n.layer, n.index) for n in found.neurons}
    total = sum(widths)
    share = f" ({100 * len(unique) / total:.2f}% of {total:,})" if total else ""
    print(f"{found.method}: {len(unique):,} neurons{share}" + (f"; {extra}" if extra else ""))
    labels = Counter(n.label for n in found.neurons if n.label is not None)
    if labels:
        print("per label: " + ", ".join(f"{label} {count:,}" for label, count in sorted(labels.items())))
    layers = Counter(layer for layer, _ in unique)
    if layers:
        print("per layer: " + ", ".join(f"{layer}: {layers.get(layer, 0):,}" for layer in range(len(widths) or max(layers) + 1)))
