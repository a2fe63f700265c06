"""Step-by-step decoding with the KV cache, shared by the sparse tests."""

from __future__ import annotations

import torch

from neuronatlas.hooks import returned_cache, with_cache


@torch.inference_mode()
def prefill_then_steps(model, ids, split):
    """Logits (B, steps, V) of ids[:, split:] fed one token at a time after prefilling ids[:, :split]."""
    out = model(input_ids=ids[:, :split], use_cache=True)
    logits, past = [out.logits[:, -1]], returned_cache(out)
    for position in range(split, ids.shape[1] - 1):
        out = model(input_ids=ids[:, position : position + 1], **with_cache(model, past), use_cache=True)
        logits.append(out.logits[:, -1])
        past = returned_cache(out)
    return torch.stack(logits, 1)
