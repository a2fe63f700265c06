"""Decode speed of a plan next to the dense model, measured so that a busy machine shows as noise.

- Threads: unless told, :func:`choose_threads` takes the cores the 1-minute load average leaves
  free (an oversubscribed machine ran dense decode at 4.6 tok/s on 2 threads and 384 on 1), and
  says why; a load above the core count adds a warning.
- Pairing: dense and sparse decode take turns step by step (:func:`paired_decode`), so a burst of
  load hits both alike; each run gives one ratio, and the JSON keeps them all, their median
  (``speedup``) and their range (``speedup_range``).
- Trust: when the range straddles 1.0 or its max/min exceeds :data:`SPREAD_FACTOR`, the spread is
  wider than the effect: :func:`speed_lines` prints the range, not one figure.
- Batches: ``batch > 1`` decodes B copies of the prompt at once (per-sequence masks); TEAL/WINA
  count their decode calls on the row kernel and on the dense fallback (``kernel_rows_share``).
- CoreInfer's per-prompt compaction (gathering the core rows at the first decode step) is inside
  its decode time and also reported alone (``compaction_s``).
- Limits: on a CPU, :func:`linear_share` times the linear layers inside a dense step, so that the
  bytes limit is also given as what it leaves of the whole step (:func:`.limit.step_limit`).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from ..hooks import returned_cache, with_cache
from .wrap import SparseModel

SPREAD_FACTOR = 1.25  # per-run ratios wider than this (max / min) are noise larger than most effects


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why): ``requested``, else the cores the 1-minute load average leaves free (at least 1)."""
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    if requested is not None:
        return requested, f"{_threads(requested)} as asked ({cores} cores, load average {load:.1f})"
    free = max(1, min(cores, math.floor(cores - load + 0.5)))
    return free, f"{_threads(free)}, the cores free: {cores} cores, load average {load:.1f} before the run"


def _threads(count: int) -> str:
    return f"{count} thread{'' if count == 1 else 's'}"


@contextmanager
def threads_set(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def paired_decode(model, sparse: SparseModel, prompt: torch.Tensor, new_tokens: int, sparse_first: bool = False) -> dict:
    """Dense and sparse greedy decodes of prompt (B, T), taking turns step by step.

    Each side prefills, then both run ``new_tokens - 1`` single-token steps on their own KV cache,
    alternating. Per-prompt work (CoreInfer compacting its core set at the first step) is inside
    the sparse side's decode time; attaching and detaching the plan between steps is not timed.
    Returns {side: {"prefill_s", "decode_s", "ids"}}, ids (new_tokens,) for B = 1, else (B, new_tokens).
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
                    out = model(input_ids=state[side]["ids"][-1], **with_cache(model, past[side]), use_cache=True)
                token = out.logits[:, -1:].argmax(-1)  # (B, 1)
                if token.is_cuda:  # kernels run asynchronously: wait for them before reading the clock
                    torch.cuda.synchronize(token.device)
                state[side]["prefill_s" if step == 0 else "decode_s"] += time.perf_counter() - started
            past[side] = returned_cache(out)
            state[side]["ids"].append(token)
    for side in sides:
        ids = torch.cat(state[side]["ids"], 1)
        state[side]["ids"] = ids[0] if ids.shape[0] == 1 else ids
    return state


def decode_speed(model, sparse: SparseModel, prompt: torch.Tensor, new_tokens: int = 32, runs: int = 5) -> dict:
    """Medians over ``runs`` paired decodes (after one warm-up), each run's ratio, their range and trust."""
    rounds, compaction = [], []
    for run in range(runs + 1):
        sparse.phase.kernel_calls.clear()
        rounds.append(paired_decode(model, sparse, prompt, new_tokens, sparse_first=run % 2 == 1))
        compaction.append(sum(getattr(runtime, "compaction_s", 0.0) for runtime in sparse.runtimes if runtime))
    rounds, compaction = rounds[1:], compaction[1:]

    def median(side: str, key: str) -> float:
        return max(statistics.median(r[side][key] for r in rounds), 1e-9)

    tokens = (new_tokens - 1) * prompt.shape[0]
    dense_speed, sparse_speed = tokens / median("dense", "decode_s"), tokens / median("sparse", "decode_s")
    ratios = [r["dense"]["decode_s"] / max(r["sparse"]["decode_s"], 1e-9) for r in rounds]
    result = {"dense_tokens_per_s": dense_speed, "sparse_tokens_per_s": sparse_speed, "speedup": sparse_speed / dense_speed,
              "speedup_per_run": ratios, "speedup_range": [min(ratios), max(ratios)],
              "speedup_reliable": spread_is_small(ratios),
              "dense_prefill_s": median("dense", "prefill_s"), "sparse_prefill_s": median("sparse", "prefill_s"),
              "prefill_speedup": median("dense", "prefill_s") / median("sparse", "prefill_s"),
              "load_average": os.getloadavg()[0], "runs": runs, "new_tokens": new_tokens,
              "prompt_tokens": int(prompt.shape[1]), "batch": int(prompt.shape[0])}
    calls = sparse.phase.kernel_calls
    if calls:
        result["kernel_rows_share"] = calls["rows"] / max(calls["rows"] + calls["dense"], 1)
    if any(compaction):
        result["compaction_s"] = statistics.median(compaction)
        result["compaction_share"] = result["compaction_s"] / median("sparse", "decode_s")
    return result


@torch.inference_mode()
def linear_share(model, prompt: torch.Tensor, new_tokens: int = 16) -> float | None:
    """The share of a dense decode step's time spent in the model's ``nn.Linear`` layers (the LM
    head included), from the clock at each layer's entry and exit over ``new_tokens - 1`` greedy
    steps after the prompt; None off the CPU, where kernels run asynchronously to the clock."""
    if prompt.device.type != "cpu":
        return None
    inside, entered = [0.0], [0.0]

    def enter(module, args):
        entered[0] = time.perf_counter()

    def leave(module, args, output):
        inside[0] += time.perf_counter() - entered[0]

    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    handles = [hook for module in linears for hook in (module.register_forward_pre_hook(enter),
                                                       module.register_forward_hook(leave))]
    try:
        out = model(input_ids=prompt, use_cache=True)
        inside[0], started = 0.0, time.perf_counter()
        for _ in range(new_tokens - 1):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, **with_cache(model, returned_cache(out)), use_cache=True)
        total = time.perf_counter() - started
    finally:
        for handle in handles:
            handle.remove()
    return inside[0] / total if total > 0 and linears else None


def spread_is_small(ratios: list[float]) -> bool:
    """Whether the per-run ratios agree well enough for one figure: all on one side of 1, max/min ≤ SPREAD_FACTOR."""
    low, high = min(ratios), max(ratios)
    return not (low < 1.0 < high) and high / max(low, 1e-9) <= SPREAD_FACTOR


def speedup_text(result: dict) -> str:
    """"1.39x (runs 1.34-1.45)" when the runs agree, else the range alone and why."""
    low, high = result["speedup_range"]
    if result.get("speedup_reliable", True):
        return f"{result['speedup']:.2f}x (runs {low:.2f}-{high:.2f})"
    digits = 2 if f"{low:.2f}" != f"{high:.2f}" else 3  # a range around 1.00 still shows its two ends
    return f"between {low:.{digits}f}x and {high:.{digits}f}x (runs spread wider than the effect: no single figure)"


def speed_lines(result: dict) -> list[str]:
    """What ``neuronatlas bench`` prints about speed."""
    lines = [f"threads: {result.get('threads_note', result.get('threads'))}"]
    lines += [f"warning: {warning}" for warning in result.get("warnings", [])]
    limit = ""
    if "bytes_limit" in result:
        step = (f"; {result['linear_share']:.0%} of a dense step is in linear layers, so at most "
                f"{result['step_limit']:.2f}x here") if "step_limit" in result else ""
        limit = f" (bytes limit {result['bytes_limit']:.2f}x{step})"
    lines.append(f"decode (batch {result.get('batch', 1)}): dense {result['dense_tokens_per_s']:.1f} tok/s, sparse "
                 f"{result['sparse_tokens_per_s']:.1f} tok/s, speedup {speedup_text(result)}{limit}")
    if "kernel_only" in result:
        lines.append(f"  of which the kernels alone, nothing skipped: {speedup_text(result['kernel_only'])}; "
                     f"skipping: {result['skipping_speedup']:.2f}x")
    if "compaction_s" in result:
        lines.append(f"CoreInfer compaction per prompt: {1e3 * result['compaction_s']:.1f} ms "
                     f"({result['compaction_share']:.0%} of the sparse decode time)")
    for point in result.get("batched", []):
        kernel = point.get("kernel_rows_share")
        note = "" if kernel is None else ("; row kernel" if kernel >= 0.5 else "; dense fallback (the kernel would be slower here)")
        lines.append(f"decode (batch {point['batch']}): dense {point['dense_tokens_per_s']:.1f} tok/s, sparse "
                     f"{point['sparse_tokens_per_s']:.1f} tok/s, speedup {speedup_text(point)}{note}")
    return lines
