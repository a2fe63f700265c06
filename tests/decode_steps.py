"""Step-by-step decoding with the KV cache, shared by the sparse tests."""

from __future__ import annotations

import torch


@torch.inference_mode()
def prefill_then_steps(model, ids, split):
    """Logits (B, steps, V) of ids[:, split:] fed one token at a time after prefilling ids[:, :split]."""
    out = model(input_ids=ids[:, :split], use_cache=True)
    logits, past = [out.logits[:, -1]], out.past_key_values
    for position in range(split, ids.shape[1] - 1):
        out = model(input_ids=ids[:, position : position + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits[:, -1])
        past = out.past_key_values
    return torch.stack(logits, 1)
