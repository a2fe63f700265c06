"""Calibration data for sparse plans: a short pass over a corpus, or an atlas's statistics.

The pass records, per layer, the inputs of the FFN projections on a sample of real tokens
(padding never enters): x (the FFN input, read by up and gate) and z (read by down). Memory is
``max_tokens x (d_model + d_ff)`` floats per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..corpus import Corpus, iter_batches, iter_windows, read_corpus
from ..errors import NeuronAtlasError
from ..loading import max_positions
from ..models import locate_neurons

DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_LENGTH = 128


@dataclass
class CalibrationSample:
    x: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, d_model) FFN inputs
    z: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, d_ff) neuron activations
    windows: list[tuple[int, int]] = field(default_factory=list)  # (first row, stop row) of each window
    source: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return len(next(iter(self.z.values()))) if self.z else 0


def as_corpus(corpus, text_field: str = "text") -> Corpus:
    return corpus if isinstance(corpus, Corpus) else read_corpus(corpus, text_field=text_field)


@torch.inference_mode()
def calibration_pass(model, tokenizer, corpus, text_field: str = "text", max_tokens: int = DEFAULT_MAX_TOKENS,
                     max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8) -> CalibrationSample:
    """Run the model over the first windows of ``corpus`` until ``max_tokens`` real tokens are seen."""
    corpus = as_corpus(corpus, text_field)
    neurons = locate_neurons(model)
    max_length = min(max_length, max_positions(model.config) or max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    parts_x, parts_z = {i: [] for i in range(neurons.num_layers)}, {i: [] for i in range(neurons.num_layers)}
    sample, seen, current = CalibrationSample(source={"corpus": str(corpus.path)}), 0, {}
    handles = []
    try:
        for layer in neurons.layers:
            handles.append(layer.up.register_forward_pre_hook(_keeper(current, ("x", layer.index))))
            handles.append(layer.down.register_forward_pre_hook(_keeper(current, ("z", layer.index))))
        for batch in iter_batches(iter_windows(corpus, tokenizer, max_length), batch_size, pad):
            current.clear()
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            real = batch.attention_mask.reshape(-1).bool().to(device)  # (B*T,)
            for (signal, index), value in current.items():
                rows = value.reshape(-1, value.shape[-1])[real].float().cpu()
                (parts_x if signal == "x" else parts_z)[index].append(rows)
            for length in batch.attention_mask.sum(1).tolist():
                sample.windows.append((seen, seen + length))
                seen += length
            if seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise NeuronAtlasError(f"calibration corpus {corpus.path} has no text; give a corpus with documents")
    sample.x = {i: torch.cat(p) for i, p in parts_x.items()}
    sample.z = {i: torch.cat(p) for i, p in parts_z.items()}
    sample.source["tokens"] = seen
    return sample


def _keeper(store: dict, key):
    def hook(module, args):
        store[key] = args[0].detach()

    return hook


# ---- from an atlas ------------------------------------------------------------------------------


def check_atlas(atlas, model) -> None:
    from ..loading import model_fingerprint

    expected = atlas.meta.get("model", {}).get("fingerprint")
    if expected is not None and expected != model_fingerprint(model):
        raise NeuronAtlasError(
            f"the atlas was profiled on another model (fingerprint {expected}); profile this model first "
            "with `neuronatlas profile`"
        )


def atlas_score_quantiles(atlas, layer: int, scale: torch.Tensor | None, points: int) -> torch.Tensor:
    """(points,) quantiles of |z_i| * scale_i over all tokens and neurons, from the histograms of z.

    The atlas keeps per neuron a histogram of z on fixed edges (0, ±10**[-3, 2] log-spaced); the
    CDF of |z_i| is known at the positive edges and interpolated log-linearly between them.
    """
    if "hist" not in {name.split(".")[0] for name in atlas.signals["z"].tensors}:
        raise NeuronAtlasError("this atlas has no histograms of z; profile again with the default options")
    hist = atlas.stat("hist", layer).double()  # (D, bins)
    edges = atlas.signals["z"].hist_edges.double()  # (bins - 1,) symmetric around 0
    zero = int((edges == 0).nonzero()[0])
    positive = edges[zero + 1 :]  # (M,)
    cumulative = hist.cumsum(1)  # cumulative[:, j] = count of values in bins 0..j
    # P(|z| < p_m) = mass of the bins between -p_m and p_m: bins zero-m+1 .. zero+m
    counts = torch.stack([cumulative[:, zero + m] - cumulative[:, zero - m] for m in range(1, len(positive) + 1)], 1)
    cdf = counts / hist.sum(1, keepdim=True).clamp(min=1)  # (D, M) at |z| = positive
    scale = torch.ones(hist.shape[0], dtype=torch.float64) if scale is None else scale.double()
    log_edges = positive.log()
    grid = torch.logspace(float(log_edges[0]) / 2.302585 - 1, float(log_edges[-1]) / 2.302585 + 1, 600, dtype=torch.float64)
    u = (grid[None, :] / scale[:, None]).log()  # (D, G): |z_i| below grid/scale_i
    position = torch.searchsorted(log_edges, u.contiguous()).clamp(1, len(log_edges) - 1)
    left, right = log_edges[position - 1], log_edges[position]
    fraction = ((u - left) / (right - left)).clamp(0, 1)
    c_left, c_right = cdf.gather(1, position - 1), cdf.gather(1, position)
    below = c_left + fraction * (c_right - c_left)
    below = torch.where(u < log_edges[0], cdf[:, :1] * (u.exp() / positive[0]).clamp(0, 1), below)
    total = below.mean(0)  # (G,) CDF of the score
    probabilities = torch.linspace(0, 1, points, dtype=torch.float64)
    index = torch.searchsorted(total.contiguous(), probabilities).clamp(0, len(grid) - 1)
    return grid[index].float()
