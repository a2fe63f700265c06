"""``bench``: speed and quality of a sparse plan next to the dense model, in one process.

Speed (:mod:`.speed`): batch-1 greedy decode (one prefill, then ``new_tokens - 1`` single-token
steps with the KV cache), dense and sparse taking turns step by step, the median of ``runs`` runs
and their range, on threads that fit the free cores; optionally the same at larger batches. For
the methods with kernels of their own (TEAL, WINA, CATS, hot, CoreInfer) also the same decode with nothing skipped
(the "kernel" control: ``kernel_only``), and ``skipping_speedup``, the speedup over that: on a CPU
a row kernel that reads every weight can itself beat the dense model's matrix-vector product. The
prompt is a held-out window, or random token ids without a corpus (a warning for TEAL and WINA,
whose per-token thresholds skip less on them). Quality: held-out perplexity of the continuation
of each window given its first ``prompt_fraction`` as the prompt (the prompt is prefilled first, as
in generation: CoreInfer chooses its core neurons there), dense and sparse, on the same tokens;
with a label field also per label (``by_label``: up to ``max_windows`` windows of each label), since
a plan calibrated on one mix of text can cost one kind of text far more than another.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..corpus import Corpus, iter_windows, read_corpus
from ..errors import NeuronAtlasError
from ..hooks import returned_cache, with_cache
from ..loading import WINDOW_LENGTH, max_positions, window_length
from ..models import check_causal
from .calibrate import as_corpus
from .limit import bytes_limit, step_limit
from .plan import KERNEL_METHODS, THRESHOLD_METHODS, SparsePlan
from .speed import choose_threads, decode_speed, linear_share, threads_set
from .teal import dense_prefill
from .wrap import SparseModel, apply_plan

MIN_WINDOW_TOKENS = 4  # a window of fewer tokens has too little continuation to score


def windows_by_label(tokenizer, corpus, label_field: str, text_field: str = "text", per_label: int = 32,
                     max_length: int = WINDOW_LENGTH) -> dict[str, list[torch.Tensor]]:
    """Up to ``per_label`` windows (at least MIN_WINDOW_TOKENS tokens) of each label of a labelled corpus, each (1, T),
    labels in the order they first appear (the whole corpus is read, so that every label is found)."""
    corpus = read_corpus(corpus, text_field=text_field, label_field=label_field) if not isinstance(corpus, Corpus) else corpus
    groups: dict[str, list[torch.Tensor]] = {}
    for window in iter_windows(corpus, tokenizer, max_length):
        kept = groups.setdefault(window.label, [])
        if len(window.input_ids) >= MIN_WINDOW_TOKENS and len(kept) < per_label:
            kept.append(torch.tensor([window.input_ids]))
    return {label: windows for label, windows in groups.items() if windows}


def eval_windows(tokenizer, corpus, text_field: str = "text", max_windows: int = 32, max_length: int = WINDOW_LENGTH) -> list[torch.Tensor]:
    """The first ``max_windows`` windows (at least MIN_WINDOW_TOKENS tokens) of a corpus, each (1, T)."""
    windows = []
    for window in iter_windows(as_corpus(corpus, text_field), tokenizer, max_length):
        if len(window.input_ids) >= MIN_WINDOW_TOKENS:
            windows.append(torch.tensor([window.input_ids]))
        if len(windows) == max_windows:
            break
    if not windows:
        raise NeuronAtlasError(f"the evaluation corpus has no window of {MIN_WINDOW_TOKENS} tokens or more; give a "
                               "corpus with text")
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
            with sparse.continuation() if sparse is not None else nullcontext():
                rest = model(input_ids=ids[:, split:], **with_cache(model, returned_cache(first)), use_cache=True)
        finally:
            if sparse is not None:
                sparse.detach()
        logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], 1).float()  # predicts ids[:, split:]
        total += float(F.cross_entropy(logits[0], ids[0, split:], reduction="sum"))
        count += ids.shape[1] - split
    return float(torch.tensor(total / count).exp())


def bench(model, tokenizer, plan: SparsePlan, corpus=None, *, text_field: str = "text", runs: int = 5,
          new_tokens: int = 32, prompt_tokens: int = 64, max_windows: int = 32, max_length: int | None = None,
          controls: bool = False, sweep: list[float] | None = None, threads: int | None = None,
          batches: list[int] | None = None, label_field: str | None = None) -> dict:
    """Speed (always) and quality (with a corpus) of ``plan`` against the dense model.

    ``threads``: torch threads for the run (None: the free cores, :func:`.speed.choose_threads`);
    ``batches``: also decode speed at these batch sizes (e.g. [4, 16]) under ``"batched"``;
    ``label_field``: also the quality of up to ``max_windows`` windows of each label, under ``"by_label"``.
    """
    check_causal(model.config, "bench", needs="decoding and next-token perplexity")
    sparse = apply_plan(model, plan)
    limit = max_positions(model.config) or (prompt_tokens + new_tokens)
    prompt_tokens = max(1, min(prompt_tokens, limit - new_tokens))
    max_length = window_length(model.config, max_length)
    windows = eval_windows(tokenizer, corpus, text_field, max_windows, max_length) if corpus is not None else None
    groups = (windows_by_label(tokenizer, corpus, label_field, text_field, max_windows, max_length)
              if corpus is not None and label_field is not None else None)  # read before the timed runs: bad fields fail fast
    threads, note = choose_threads(threads)
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    result = {"method": plan.method, "sparsity": plan.sparsity, "threads": threads, "threads_note": note,
              "load_average_before": load, "warnings": []}
    if plan.method in THRESHOLD_METHODS:  # what the plan does to a prompt's own tokens (see teal.py)
        result["prefill"] = "dense" if dense_prefill(plan) else "sparse"
    limit = bytes_limit(model, plan)
    if limit is not None:
        result["bytes_limit"] = limit  # batch 1: dense weight bytes read a step over the plan's
    if load > cores:
        result["warnings"].append(f"load average {load:.1f} is above the {cores} cores: timings are unreliable")
    if windows is None and plan.method in THRESHOLD_METHODS:
        result["warnings"].append(
            f"no corpus: the prompt is random token ids, and {plan.method} keeps channels by their size per token, "
            "which random ids do not share with text (SmolLM2, TEAL 50%: 1.17x on random ids, 1.39x on held-out "
            "text): pass --corpus for the speed on text")
    with threads_set(threads):
        prompt = _prompt(model, windows, prompt_tokens)
        share = linear_share(model, prompt, new_tokens)
        if share is not None and limit is not None:
            result["linear_share"], result["step_limit"] = share, step_limit(limit, share)
        result |= decode_speed(model, sparse, prompt, new_tokens, runs)
        result["batched"] = [decode_speed(model, sparse, _prompt(model, windows, prompt_tokens, batch), new_tokens, runs)
                             for batch in batches or []]
        del sparse  # its row tables go before the kernel control builds its own
        if plan.method in KERNEL_METHODS:  # how much of the speedup the kernels give with nothing skipped
            control = apply_plan(model, plan.as_control("kernel"))
            result["kernel_only"] = kernel_only(decode_speed(model, control, prompt, new_tokens, runs))
            result["skipping_speedup"] = result["speedup"] / result["kernel_only"]["speedup"]
    if not result["batched"]:
        del result["batched"]
    if windows is not None:
        result |= quality(model, plan, windows, controls)
        if sweep:
            result["sweep"] = [quality(model, plan.at_sparsity(s), windows, True, result["ppl_dense"]) | {"sparsity": s}
                               for s in sweep]
        if groups is not None:
            result["by_label"] = {label: quality(model, plan, group, controls) for label, group in groups.items()}
    return result


def kernel_only(speed: dict) -> dict:
    """The fields of a decode-speed result that describe the kernel control's run."""
    return {key: speed[key] for key in ("dense_tokens_per_s", "sparse_tokens_per_s", "speedup", "speedup_range",
                                        "speedup_reliable")}


def quality(model, plan: SparsePlan, windows, controls: bool = False, ppl_dense: float | None = None) -> dict:
    """Perplexity of the plan (and of its random control) next to dense (measured unless given)."""
    dense = perplexity(model, windows) if ppl_dense is None else ppl_dense
    sparse = perplexity(model, windows, SparseModel(model, plan))
    out = {"ppl_dense": dense, "ppl_sparse": sparse, "ppl_ratio": sparse / dense, "eval_windows": len(windows)}
    if controls:
        out["ppl_random"] = perplexity(model, windows, SparseModel(model, plan.as_control("random")))
    return out


def _prompt(model, windows, prompt_tokens: int, batch: int = 1) -> torch.Tensor:
    """(batch, prompt_tokens): window b's tokens repeated up to ``prompt_tokens`` (seeded random ids without a corpus)."""
    device = next(model.parameters()).device
    rows = []
    for row in range(batch):
        if windows:
            ids = windows[row % len(windows)][0]
            ids = ids.repeat(prompt_tokens // len(ids) + 1)[:prompt_tokens]
        else:
            ids = torch.randint(model.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(row))
        rows.append(ids)
    return torch.stack(rows).to(device)
