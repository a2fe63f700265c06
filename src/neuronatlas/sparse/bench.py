"""``bench``: speed and quality of a sparse plan next to the dense model, in one process.

Speed: batch-1 greedy decode (one prefill, then ``new_tokens - 1`` single-token steps with the KV
cache), dense and sparse taking turns step by step (:func:`paired_decode`), the median of ``runs``
runs; tokens/s of the decode steps, the prefill time, and their ratio. Quality: held-out
perplexity of the continuation of each window given its first ``prompt_fraction`` as the prompt
(the prompt is prefilled first, as in generation: CoreInfer chooses its core neurons there), dense
and sparse, on the same tokens.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..corpus import iter_windows
from ..errors import NeuronAtlasError
from ..loading import max_positions
from .calibrate import as_corpus
from .plan import SparsePlan
from .wrap import ENCODER_TYPES, SparseModel, apply_plan


def check_decoder(model) -> None:
    if model.config.model_type in ENCODER_TYPES or getattr(model.config, "is_encoder_decoder", False):
        raise NeuronAtlasError(
            f"bench measures decoding and next-token perplexity; {model.config.model_type} is an encoder: "
            "bench a decoder model (llama, gpt2, ...)"
        )


@torch.inference_mode()
def paired_decode(model, sparse: SparseModel, prompt: torch.Tensor, new_tokens: int, sparse_first: bool = False) -> dict:
    """Dense and sparse greedy decodes of prompt (1, T), taking turns step by step.

    Each side prefills, then both run ``new_tokens - 1`` single-token steps on their own KV cache,
    alternating, so a burst of load from other processes hits both alike. Per-prompt work (CoreInfer
    compacting its core set at the first step) is inside the sparse side's decode time; attaching
    and detaching the plan between steps is not timed. Returns {side: {"prefill_s", "decode_s", "ids"}}.
    """
    sides = ("sparse", "dense") if sparse_first else ("dense", "sparse")
    state = {side: {"prefill_s": 0.0, "decode_s": 0.0, "ids": []} for side in sides}
    past = {}
    for step in range(new_tokens):
        for side in sides if step % 2 == 0 else sides[::-1]:
            with sparse if side == "sparse" else nullcontext():
                started = time.perf_counter()
                if step == 0:
                    out = model(input_ids=prompt, use_cache=True)
                else:
                    out = model(input_ids=state[side]["ids"][-1], past_key_values=past[side], use_cache=True)
                token = out.logits[:, -1:].argmax(-1)  # (1, 1)
                if token.is_cuda:  # kernels run asynchronously: wait for them before reading the clock
                    torch.cuda.synchronize(token.device)
                state[side]["prefill_s" if step == 0 else "decode_s"] += time.perf_counter() - started
            past[side] = out.past_key_values
            state[side]["ids"].append(token)
    for side in sides:
        state[side]["ids"] = torch.cat(state[side]["ids"], 1)[0]  # (new_tokens,)
    return state


def decode_speed(model, sparse: SparseModel, prompt: torch.Tensor, new_tokens: int = 32, runs: int = 5) -> dict:
    """Medians over ``runs`` paired decodes (after one warm-up), and each run's speedup to show the noise."""
    rounds = [paired_decode(model, sparse, prompt, new_tokens, sparse_first=run % 2 == 1) for run in range(runs + 1)][1:]

    def median(side: str, key: str) -> float:
        return max(statistics.median(r[side][key] for r in rounds), 1e-9)

    steps = new_tokens - 1
    dense_speed, sparse_speed = steps / median("dense", "decode_s"), steps / median("sparse", "decode_s")
    return {"dense_tokens_per_s": dense_speed, "sparse_tokens_per_s": sparse_speed, "speedup": sparse_speed / dense_speed,
            "dense_prefill_s": median("dense", "prefill_s"), "sparse_prefill_s": median("sparse", "prefill_s"),
            "prefill_speedup": median("dense", "prefill_s") / median("sparse", "prefill_s"),
            "speedup_per_run": [r["dense"]["decode_s"] / max(r["sparse"]["decode_s"], 1e-9) for r in rounds],
            "load_average": os.getloadavg()[0], "runs": runs, "new_tokens": new_tokens,
            "prompt_tokens": int(prompt.shape[1])}


def eval_windows(tokenizer, corpus, text_field: str = "text", max_windows: int = 32, max_length: int = 128) -> list[torch.Tensor]:
    """The first ``max_windows`` windows (at least 4 tokens) of a corpus, each (1, T)."""
    windows = []
    for window in iter_windows(as_corpus(corpus, text_field), tokenizer, max_length):
        if len(window.input_ids) >= 4:
            windows.append(torch.tensor([window.input_ids]))
        if len(windows) == max_windows:
            break
    if not windows:
        raise NeuronAtlasError("the evaluation corpus has no window of 4 tokens or more; give a corpus with text")
    return windows


@torch.inference_mode()
def perplexity(model, windows: list[torch.Tensor], sparse: SparseModel | None = None, prompt_fraction: float = 0.5) -> float:
    """exp(mean NLL) of each window's continuation after its first ``prompt_fraction`` is prefilled."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in windows:
        ids = ids.to(device)
        split = max(1, min(ids.shape[1] - 1, int(ids.shape[1] * prompt_fraction)))
        if sparse is not None:
            sparse.attach()
        try:
            first = model(input_ids=ids[:, :split], use_cache=True)
            if sparse is not None:
                with sparse.continuation():
                    rest = model(input_ids=ids[:, split:], past_key_values=first.past_key_values, use_cache=True)
            else:
                rest = model(input_ids=ids[:, split:], past_key_values=first.past_key_values, use_cache=True)
        finally:
            if sparse is not None:
                sparse.detach()
        logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], 1).float()  # predicts ids[:, split:]
        total += float(F.cross_entropy(logits[0], ids[0, split:], reduction="sum"))
        count += ids.shape[1] - split
    return float(torch.tensor(total / count).exp())


def bench(model, tokenizer, plan: SparsePlan, corpus=None, *, text_field: str = "text", runs: int = 5,
          new_tokens: int = 32, prompt_tokens: int = 64, max_windows: int = 32, max_length: int = 128,
          controls: bool = False, sweep: list[float] | None = None) -> dict:
    """Speed (always) and quality (with a corpus) of ``plan`` against the dense model."""
    check_decoder(model)
    sparse = apply_plan(model, plan)
    limit = max_positions(model.config) or (prompt_tokens + new_tokens)
    prompt_tokens = max(1, min(prompt_tokens, limit - new_tokens))
    windows = eval_windows(tokenizer, corpus, text_field, max_windows, max_length) if corpus is not None else None
    result = {"method": plan.method, "sparsity": plan.sparsity, "threads": torch.get_num_threads()}
    result |= decode_speed(model, sparse, _prompt(model, windows, prompt_tokens), new_tokens, runs)
    if windows is not None:
        result |= quality(model, plan, windows, controls)
        if sweep:
            result["sweep"] = [quality(model, plan.at_sparsity(s), windows, True, result["ppl_dense"]) | {"sparsity": s}
                               for s in sweep]
    return result


def quality(model, plan: SparsePlan, windows, controls: bool = False, ppl_dense: float | None = None) -> dict:
    """Perplexity of the plan (and of its random control) next to dense (measured unless given)."""
    dense = perplexity(model, windows) if ppl_dense is None else ppl_dense
    sparse = perplexity(model, windows, SparseModel(model, plan))
    out = {"ppl_dense": dense, "ppl_sparse": sparse, "ppl_ratio": sparse / dense, "eval_windows": len(windows)}
    if controls:
        out["ppl_random"] = perplexity(model, windows, SparseModel(model, plan.as_control("random")))
    return out


def _prompt(model, windows, prompt_tokens: int) -> torch.Tensor:
    """The first window's tokens, repeated up to ``prompt_tokens``; seeded random ids without a corpus."""
    device = next(model.parameters()).device
    if windows:
        ids = windows[0][0]
        ids = ids.repeat(prompt_tokens // len(ids) + 1)[:prompt_tokens]
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(model.config.vocab_size, (prompt_tokens,), generator=generator)
    return ids[None].to(device)
