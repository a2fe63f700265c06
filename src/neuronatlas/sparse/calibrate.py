"""Calibration data for sparse plans: a short pass over a corpus, or an atlas's statistics.

The pass records, per layer, the inputs of the FFN projections on a sample of real tokens
(padding never enters): x (the FFN input, read by up and gate) and z (read by down); with
``attention=True`` also the attention projections' inputs (``qkv``: read by q, k and v; ``o``);
with ``block_tokens > 0`` the first batches' calls of every block (inputs, keyword arguments and
dense output), which TEAL's greedy allocation replays. Memory is ``max_tokens x (d_model + d_ff)``
floats per layer (``+ d_model + d_attn`` with attention).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from ..corpus import Corpus, iter_batches, iter_windows, read_corpus
from ..errors import NeuronAtlasError
from ..hooks import forward_batch, hook_sites, pad_token_id
from ..loading import max_positions
from ..models import locate_neurons
from .attention import sparse_layers

DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_LENGTH = 128


@dataclass
class BlockCall:
    """One recorded call of a block: replaying it with sparse projections gives the block's error."""

    args: tuple  # positional arguments, hidden states (B, T, d_model) first
    kwargs: dict  # masks, positions, rotary embeddings ... as the model passed them
    output: torch.Tensor  # (B, T, d_model) dense output
    real: torch.Tensor  # (B, T) bool: real tokens (padding is left out of the error)


@dataclass
class CalibrationSample:
    x: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, d_model) FFN inputs
    z: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, d_ff) neuron activations
    windows: list[tuple[int, int]] = field(default_factory=list)  # (first row, stop row) of each window
    source: dict = field(default_factory=dict)
    attention: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # "qkv"/"o" -> layer -> (N, in)
    blocks: dict[int, list[BlockCall]] = field(default_factory=dict)  # layer -> recorded calls

    @property
    def tokens(self) -> int:
        return len(next(iter(self.z.values()))) if self.z else 0

    def inputs(self, group: str, layer: int) -> torch.Tensor:
        """(N, in) calibration inputs of a projection input group: "up" (x), "down" (z), "qkv", "o"."""
        if group in ("up", "down"):
            return (self.x if group == "up" else self.z)[layer]
        return self.attention[group][layer]


def as_corpus(corpus, text_field: str = "text") -> Corpus:
    return corpus if isinstance(corpus, Corpus) else read_corpus(corpus, text_field=text_field)


@torch.inference_mode()
def calibration_pass(model, tokenizer, corpus, text_field: str = "text", max_tokens: int = DEFAULT_MAX_TOKENS,
                     max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8, attention: bool = False,
                     block_tokens: int = 0) -> CalibrationSample:
    """Run the model over the first windows of ``corpus`` until ``max_tokens`` real tokens are seen."""
    corpus = as_corpus(corpus, text_field)
    neurons = locate_neurons(model)
    max_length = min(max_length, max_positions(model.config) or max_length)
    if block_tokens:  # recorded calls are whole batches: small ones keep the replayed tokens near block_tokens
        batch_size = max(1, min(batch_size, -(-block_tokens // max_length)))
    device = next(model.parameters()).device
    parts: dict[tuple[str, int], list] = {}
    sample, seen, current, calls = CalibrationSample(source={"corpus": str(corpus.path)}), 0, {}, {}
    with ExitStack() as stack:
        stack.enter_context(hook_sites(neurons, before_up=_keeper(current, "x"), before_down=_keeper(current, "z")))
        layers = sparse_layers(model) if attention or block_tokens else []
        if attention:
            _keep_attention_inputs(stack, layers, current)
        for batch in iter_batches(iter_windows(corpus, tokenizer, max_length), batch_size, pad_token_id(tokenizer)):
            current.clear()
            recording = seen < block_tokens
            with ExitStack() as blocks:
                if recording:
                    _record_blocks(blocks, layers, calls, batch.attention_mask.bool().to(device))
                forward_batch(model, batch.input_ids.to(device), batch.attention_mask.to(device))
            real = batch.attention_mask.reshape(-1).bool().to(device)  # (B*T,)
            for key, value in current.items():
                parts.setdefault(key, []).append(value.reshape(-1, value.shape[-1])[real].float().cpu())
            for length in batch.attention_mask.sum(1).tolist():
                sample.windows.append((seen, seen + length))
                seen += length
            if seen >= max_tokens:
                break
    if seen == 0:
        raise NeuronAtlasError(f"calibration corpus {corpus.path} has no text; give a corpus with documents")
    for (signal, index), rows in parts.items():
        table = sample.x if signal == "x" else sample.z if signal == "z" else sample.attention.setdefault(signal, {})
        table[index] = torch.cat(rows)
    sample.blocks = calls
    sample.source["tokens"] = seen
    return sample


def _keeper(store: dict, signal: str):
    """A site function that keeps the tensor it sees in ``store[(signal, layer)]``."""
    def keep(layer: int, tensor: torch.Tensor) -> None:
        store[(signal, layer)] = tensor.detach()

    return keep


def _keep_attention_inputs(stack: ExitStack, layers, current: dict) -> None:
    """Pre-hooks keeping the input of the first q/k/v (or fused qkv) projection and of o, per layer."""
    for layer in layers:
        first = next(role for role in ("qkv", "q") if role in layer.attention)
        for group, role in (("qkv", first), ("o", "o")):
            keep = _keeper(current, group)
            hook = layer.attention[role].register_forward_pre_hook(
                lambda module, args, keep=keep, index=layer.index: keep(index, args[0]))
            stack.callback(hook.remove)


def _record_blocks(stack: ExitStack, layers, calls: dict, real: torch.Tensor) -> None:
    """Hooks recording each block's call (arguments and dense output) of this batch in ``calls``."""
    for layer in layers:
        def record(module, args, kwargs, output, index=layer.index):
            hidden = output[0] if isinstance(output, tuple) else output
            kwargs = {key: value for key, value in kwargs.items() if key not in ("past_key_value", "past_key_values")}
            calls.setdefault(index, []).append(BlockCall(args, kwargs, hidden.detach(), real))

        hook = layer.block.register_forward_hook(record, with_kwargs=True)
        stack.callback(hook.remove)


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
