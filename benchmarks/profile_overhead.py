#!/usr/bin/env python3
"""How much profiling costs: the whole profile() against a bare forward, peak memory, atlas bytes.

1. Throughput of the whole ``profile()`` call (the model given loaded: loading is not timed; the
   tokenisation, statistics, exemplar windows, contexts and the atlas written are), against a bare
   Hugging Face forward of the CausalLM (``model(input_ids, attention_mask)``) and against plain
   torch forward hooks that only receive z, over the same windows in the same batches (corpus
   order, each padded to its longest window), alternating in one process for several rounds after
   a warm-up round. Reports median tokens/s and the ratios profile/bare and profile/hooks per round
   as ``median [min, max]`` (goals: >= 0.8 on the bundled tiny-llama, >= 0.9 on SmolLM2-135M), and
   the atlas bytes per neuron (goal: <= 2 KB), and the time after the pass (coding the exemplar
   windows, the contexts, writing the atlas: a cost per atlas, not per token) and its share of a
   same-batch profile. "profile" runs the bare forward's very batches
   (``bucket_batches=1``, ``batch_tokens=0``); "bucketed" is profile's default, windows batched by
   length inside buffers of 8 batches, a batch taking more than 8 short windows within the
   automatic token budget: its ratio to the naive padded bare forward is the speed a user sees on
   a corpus of mixed lengths. Windows are profile's default length (min(model positions, 512));
   ``--whole-max-length 128`` gives the shorter windows of earlier measurements. Default models:
   the bundled tiny-llama, then SmolLM2-135M-Instruct (Q4_1 GGUF) when fetched into
   ~/.cache/neuronatlas/real-models/.
2. Memory: a child process loads the model, reads every weight once and notes its resident set
   (the loaded model's footprint: the runtime and the weights), resets the peak, profiles, and
   notes the profile's own peak; another runs a bare forward over the same windows instead. The
   profile's peak is reported against that footprint (goal: <= 1.5x), the weights' bytes and the
   bare forward's peak; the load's own peak (a GGUF file's dequantisation) separately.
3. ``--steps``: the profiler's step batch by batch against a bare forward on a random Llama, with
   the share of time in the hooks and the statistics (where the time goes).

On a busy machine the ratios move a lot from round to round: compare the per-round lines, and set
``--threads 1`` when the cores are oversubscribed (multi-threaded torch ops then wait for
descheduled threads, which makes the bare forward itself erratic).

    python benchmarks/profile_overhead.py                     # tiny-llama and SmolLM2 if fetched
    python benchmarks/profile_overhead.py --model PATH.gguf --whole-docs 60 --json overhead.json
    python benchmarks/profile_overhead.py --stat-threads 1    # statistics threads: 0 = auto

Ends with plain ``key: value`` lines (``--json PATH`` writes them too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

import neuronatlas.profile.run as profile_module
from neuronatlas.bundled import CORPUS_TRAIN, ROOT as BUNDLED_ROOT
from neuronatlas.corpus import iter_batches, iter_windows, read_corpus
from neuronatlas.loading import load_model, max_positions
from neuronatlas.models import locate_neurons
from neuronatlas.hooks import capture, forward_batch, pad_token_id
from neuronatlas.profile import ProfileOptions, ProfileRun, profile, run_metadata
from neuronatlas.profile.options import resolve_max_length
from neuronatlas.stats import SignalStats

TINY_LLAMA = BUNDLED_ROOT / "models" / "tiny-llama"
SMOLLM2 = next(iter(sorted((Path.home() / ".cache" / "neuronatlas" / "real-models" / "smollm2-135m").glob("*.gguf"))), None)

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, object] = {"torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="profile-overhead-") as tmp:
        tmp = Path(tmp)
        corpus = first_documents(Path(args.corpus), tmp / "whole.jsonl", args.whole_docs)
        models = [Path(args.model)] if args.model else [TINY_LLAMA] + ([SMOLLM2] if SMOLLM2 else [])
        for model in models:
            name = "tiny" if model == TINY_LLAMA else "smollm2" if model == SMOLLM2 else "model"
            say(f"whole profile(): {model.name} on {args.whole_docs} documents")
            results.update({f"{name}_{key}": value for key, value in measure_whole(model, corpus, args, tmp).items()})
        if not args.skip_memory:
            model = Path(args.memory_model) if args.memory_model else SMOLLM2 or TINY_LLAMA
            say(f"memory: {model.name} on {args.whole_docs} documents, in a child process")
            results.update(measure_model_memory(model, corpus, tmp, args))
        if args.steps:
            say("per batch: the profiler's step against a bare forward (random Llama)")
            model_path = tmp / "random-llama"
            tokenizer_source = TINY_LLAMA if (TINY_LLAMA / "tokenizer.json").exists() else None
            build_random_llama(model_path, args.hidden, args.intermediate, args.layers, args.heads, args.vocab,
                               tokenizer_source, Path(args.corpus), args.text_field)
            packed = pack_corpus(Path(args.corpus), tmp / "packed.jsonl", args.text_field, args.label_field, 1024)
            results.update({f"steps_{key}": value for key, value in
                            measure_throughput(model_path, packed, args, 4, 256).items() if key != "rounds"})
    print()
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder or .gguf file (default: the bundled tiny-llama, then "
                                        "SmolLM2-135M when fetched by scripts/fetch_real_models)")
    parser.add_argument("--corpus", default=str(CORPUS_TRAIN), help="a jsonl corpus (default: the bundled train.jsonl)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="lang")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8, profile's default)")
    parser.add_argument("--whole-docs", type=int, default=60, help="documents profiled (default: 60)")
    parser.add_argument("--whole-max-length", type=int, default=0,
                        help="tokens per window (default: 0, profile's own: min(model positions, 512))")
    parser.add_argument("--whole-rounds", type=int, default=3, help="timed rounds after a warm-up (default: 3)")
    parser.add_argument("--stat-threads", type=int, default=0, help="profile's statistics threads, 0 = auto (default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak memory run")
    parser.add_argument("--memory-model", help="model of the memory run (default: SmolLM2 if fetched, else tiny-llama)")
    parser.add_argument("--steps", action="store_true",
                        help="also time the profiler's step batch by batch on a random Llama (where the time goes)")
    parser.add_argument("--hidden", type=int, default=1024, help="--steps model: hidden size (default: 1024)")
    parser.add_argument("--intermediate", type=int, default=2816, help="--steps model: FFN width (default: 2816)")
    parser.add_argument("--layers", type=int, default=4, help="--steps model: layers (default: 4)")
    parser.add_argument("--heads", type=int, default=16, help="--steps model: attention heads (default: 16)")
    parser.add_argument("--vocab", type=int, default=32000, help="--steps model: vocabulary size (default: 32000)")
    parser.add_argument("--rounds", type=int, default=5, help="--steps: timed rounds (default: 5)")
    parser.add_argument("--batches", type=int, default=2, help="--steps: batches per round (default: 2)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- inputs -------------------------------------------------------------------------------------


def build_random_llama(out: Path, hidden: int, intermediate: int, layers: int, heads: int, vocab: int,
                       tokenizer_source: Path | None, corpus: Path, text_field: str) -> str:
    """A randomly initialised LlamaForCausalLM saved with a tokenizer; returns a description."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    if tokenizer_source is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_source / name).exists():
                shutil.copy(tokenizer_source / name, out / name)
        tokenizer = f"tokenizer of {tokenizer_source.name}"
    else:
        train_tokenizer(corpus, text_field, min(vocab, 8000)).save_pretrained(out)
        tokenizer = "byte-level BPE trained on the corpus"
    return (f"random Llama hidden={hidden} intermediate={intermediate} layers={layers} heads={heads} "
            f"vocab={vocab} ({tokenizer})")


def train_tokenizer(corpus: Path, text_field: str, vocab_size: int):
    """A byte-level BPE tokenizer that prepends <s>, trained on the corpus texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    with corpus.open(encoding="utf-8") as handle:
        texts = [json.loads(line)[text_field] for line in handle if line.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def pack_corpus(source: Path, out: Path, text_field: str, label_field: str, tokens: int) -> Path:
    """Join consecutive documents of each label (about 4 characters a token) into longer ones."""
    pending: dict[str, list[str]] = {}
    rows = []
    with source.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            label = record.get(label_field)
            texts = pending.setdefault(label, [])
            texts.append(record[text_field])
            if sum(len(text) for text in texts) >= 4 * tokens:
                rows.append({text_field: "\n".join(texts), label_field: label})
                texts.clear()
    rows += [{text_field: "\n".join(texts), label_field: label} for label, texts in pending.items() if texts]
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return out


# ---- throughput ---------------------------------------------------------------------------------


def timed(function, note):
    """``function``, calling ``note(seconds)`` with the wall time of each call."""
    def call(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            note(time.perf_counter() - started)

    return call


@contextlib.contextmanager
def timers(seconds: dict[str, float]):
    """Adds the wall time of the profiler's hook callbacks to ``seconds["hooks"]`` (selecting the
    real tokens, then the statistics) and of ``SignalStats.update`` to ``seconds["stats"]``."""
    update, capture = SignalStats.update, profile_module.capture

    def add(key):
        return lambda elapsed: seconds.__setitem__(key, seconds[key] + elapsed)

    def timed_capture(neurons, on_activation=None, on_gate=None):
        return capture(neurons, on_activation and timed(on_activation, add("hooks")),
                       on_gate and timed(on_gate, add("hooks")))

    SignalStats.update, profile_module.capture = timed(update, add("stats")), timed_capture
    try:
        yield
    finally:
        SignalStats.update, profile_module.capture = update, capture


def measure_throughput(model_path: Path, corpus_path: Path, args, batch_size: int, max_length: int) -> dict:
    model, tokenizer = load_model(str(model_path), device="cpu")
    neurons = locate_neurons(model)
    corpus = read_corpus(corpus_path, text_field=args.text_field, label_field=args.label_field)
    options = ProfileOptions(batch_size=batch_size, max_length=min(max_length, max_positions(model.config) or max_length))
    meta = run_metadata(model, tokenizer, neurons, corpus, corpus.validate(), options)
    run = ProfileRun(neurons, tokenizer, corpus, meta, options)
    base = run.base
    pad = run.pad_id
    needed = (args.rounds + 1) * args.batches  # one untimed warm-up round first
    batches = list(islice(iter_batches(iter_windows(corpus, tokenizer, options.max_length), batch_size, pad), needed))
    if len(batches) < needed:
        raise SystemExit(f"the corpus gives {len(batches)} batches, {needed} needed: lower --rounds or --batches")

    def bare(batch) -> None:
        forward_batch(base, batch.input_ids, batch.attention_mask.bool())

    rounds = []
    with torch.inference_mode():
        for index in range(args.rounds + 1):
            group = batches[index * args.batches : (index + 1) * args.batches]
            seconds = {"bare": 0.0, "profiled": 0.0, "hooks": 0.0, "stats": 0.0}
            for batch in group:  # bare then profiled on each batch, so both see the same machine load
                started = time.perf_counter()
                bare(batch)
                seconds["bare"] += time.perf_counter() - started
                with timers(seconds):
                    started = time.perf_counter()
                    run.step(batch)
                    seconds["profiled"] += time.perf_counter() - started
            if index == 0:
                continue  # warm-up
            tokens = sum(int(batch.attention_mask.sum()) for batch in group)
            rounds.append({"tokens": tokens, **seconds})
            say(f"  round {index}: {tokens} tokens, bare {tokens / seconds['bare']:,.0f} tok/s, profiled "
                f"{tokens / seconds['profiled']:,.0f} tok/s, ratio {seconds['bare'] / seconds['profiled']:.3f}; "
                f"of the profiled {seconds['profiled']:.2f} s: hooks {seconds['hooks']:.2f} s, "
                f"of which statistics {seconds['stats']:.2f} s")
    shape = batches[1].input_ids.shape
    return {
        "batch": f"{shape[0]} windows of up to {options.max_length} tokens "
                 f"({sum(r['tokens'] for r in rounds) // len(rounds) // args.batches} real tokens per batch on average), "
                 f"{args.batches} batches x {args.rounds} rounds",
        "bare_tokens_per_s": round(statistics.median(r["tokens"] / r["bare"] for r in rounds), 1),
        "profiled_tokens_per_s": round(statistics.median(r["tokens"] / r["profiled"] for r in rounds), 1),
        "throughput_ratio": round(statistics.median(r["bare"] / r["profiled"] for r in rounds), 3),
        "throughput_ratio_all_rounds": round(sum(r["bare"] for r in rounds) / sum(r["profiled"] for r in rounds), 3),
        "hooks_share_of_profiled_time": round(statistics.median(r["hooks"] / r["profiled"] for r in rounds), 3),
        "stats_share_of_profiled_time": round(statistics.median(r["stats"] / r["profiled"] for r in rounds), 3),
        "rounds": rounds,
    }


# ---- the whole profile() call ---------------------------------------------------------------------


def first_documents(source: Path, out: Path, count: int) -> Path:
    with source.open(encoding="utf-8") as handle:
        lines = [line if line.endswith("\n") else line + "\n" for line in islice(handle, count)]
    out.write_text("".join(lines), encoding="utf-8")
    return out


def measure_whole(model_path: Path, corpus_path: Path, args, tmp: Path) -> dict:
    """profile() (the model given loaded: loading is not timed) against a bare CausalLM forward and
    against plain forward hooks that only receive z, over the same windows in the same batches (corpus
    order, padded to the longest of each batch), alternating in one process for several rounds."""
    model, tokenizer = load_model(str(model_path), device="cpu", quiet=True)
    neurons = locate_neurons(model)
    max_length = resolve_max_length(model.config, args.whole_max_length or None)
    corpus = read_corpus(corpus_path, text_field=args.text_field, label_field=args.label_field)
    batches = list(iter_batches(iter_windows(corpus, tokenizer, max_length), args.batch_size, pad_token_id(tokenizer)))
    tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
    padded = sum(batch.attention_mask.numel() for batch in batches)
    gated = "gate" if neurons.gated else None

    def bare() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    def hooked() -> None:
        with capture(neurons, lambda layer, z: None, (lambda layer, g: None) if gated else None):
            bare()

    def profiled(bucket_batches: int) -> None:
        threads = {"stat_threads": args.stat_threads} if args.stat_threads else {}  # (older versions lack it)
        # bucket_batches 1: the bare forward's very batches (batch_size windows each, no token budget)
        budget = {"batch_tokens": 0} if bucket_batches == 1 else {}
        options = ProfileOptions(batch_size=args.batch_size, max_length=max_length, bucket_batches=bucket_batches,
                                 **threads, **budget)
        profile(model, corpus, tmp / "whole-atlas", tokenizer=tokenizer, label_field=args.label_field,
                options=options, overwrite=True, quiet=True)

    # "profile": the very batches of the bare forward (corpus order); "bucketed": profile's default,
    # windows batched by length inside buffers of 8 batches (less padding computed)
    runs = {"bare": bare, "hooks": hooked, "profile": lambda: profiled(1), "bucketed": lambda: profiled(8)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    finishing: list[float] = []  # per profile() call: the time after the pass (windows coded, contexts, atlas written)
    for index in range(args.whole_rounds + 1):  # round 0 warms up
        order = list(runs)[index % len(runs):] + list(runs)[: index % len(runs)]  # rotate who goes first
        for name in order:
            started = time.perf_counter()
            with timed_finish(finishing if index and name == "profile" else []):
                runs[name]()
            if index:
                seconds[name].append(time.perf_counter() - started)
        if index:
            say(f"  round {index}: " + ", ".join(f"{name} {tokens / seconds[name][-1]:,.0f} tok/s" for name in runs)
                + f"; profile/bare {seconds['bare'][-1] / seconds['profile'][-1]:.3f}"
                + f", bucketed/bare {seconds['bare'][-1] / seconds['bucketed'][-1]:.3f}")
    atlas_bytes = sum(path.stat().st_size for path in (tmp / "whole-atlas").iterdir() if path.is_file())
    ratio = [b / p for b, p in zip(seconds["bare"], seconds["profile"])]
    hooks_ratio = [h / p for h, p in zip(seconds["hooks"], seconds["profile"])]
    bucketed_ratio = [b / p for b, p in zip(seconds["bare"], seconds["bucketed"])]
    return {
        "corpus": f"{corpus.validate()['documents']} documents, {len(batches)} batches of {args.batch_size}, "
                  f"max length {max_length}, {tokens} real tokens ({padded} with padding)",
        "bare_tokens_per_s": round(statistics.median(tokens / t for t in seconds["bare"]), 1),
        "hooks_tokens_per_s": round(statistics.median(tokens / t for t in seconds["hooks"]), 1),
        "profile_tokens_per_s": round(statistics.median(tokens / t for t in seconds["profile"]), 1),
        "profile_over_bare": spread(ratio),
        "profile_over_hooks": spread(hooks_ratio),
        "bucketed_tokens_per_s": round(statistics.median(tokens / t for t in seconds["bucketed"]), 1),
        "bucketed_over_bare": spread(bucketed_ratio),
        "atlas_bytes_per_neuron": round(atlas_bytes / sum(neurons.widths), 1),
        # a cost per atlas, not per token: what keeps a small corpus's ratio down
        "profile_finish_s": round(statistics.median(finishing), 3),
        "profile_finish_share": round(statistics.median(f / p for f, p in zip(finishing, seconds["profile"])), 3),
        "stat_threads": args.stat_threads or "auto",
    }


@contextlib.contextmanager
def timed_finish(into: list[float]):
    """Appends to ``into`` the wall time of ProfileRun.finish during the block."""
    finish = profile_module.ProfileRun.finish
    profile_module.ProfileRun.finish = timed(finish, into.append)
    try:
        yield
    finally:
        profile_module.ProfileRun.finish = finish


def spread(ratios: list[float]) -> str:
    """median [min, max] of per-round ratios."""
    return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"


# ---- memory -------------------------------------------------------------------------------------


# Loads the model, notes the load's peak RSS, reads every weight once (a safetensors file is mapped:
# its pages are only resident once read) and notes the resident set: the loaded model's footprint
# (the runtime's imports and the weights). Then it resets the peak (Linux: /proc/self/clear_refs) and
# either profiles or runs a bare forward over the same windows in the same batches, and notes the
# peak of that run alone.
MEMORY_CHILD = """
import json, resource, sys, torch
from neuronatlas.corpus import iter_batches, iter_windows, read_corpus
from neuronatlas.hooks import pad_token_id
from neuronatlas.loading import load_model
from neuronatlas.profile import ProfileOptions, profile
from neuronatlas.profile.options import resolve_max_length


def status_kib(field):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: the process's peak
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes there, KiB on Linux


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM, the peak resident set
        return True
    except OSError:
        return False


mode, model_path, corpus, out, label_field, max_length = sys.argv[1:7]
model, tokenizer = load_model(model_path, device="cpu", quiet=True)
max_length = resolve_max_length(model.config, int(max_length) or None)
load_peak = status_kib("VmHWM")
with torch.inference_mode():
    for parameter in model.parameters():
        parameter.sum()  # every page of the weights resident
footprint = status_kib("VmRSS")
reset = reset_peak()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
if mode == "profile":
    profile(model, corpus, out, tokenizer=tokenizer, label_field=label_field, quiet=True,
            options=ProfileOptions(max_length=max_length))
else:
    windows = iter_windows(read_corpus(corpus, label_field=label_field), tokenizer, max_length)
    with torch.inference_mode():
        for batch in iter_batches(windows, 8, pad_token_id(tokenizer)):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
print(json.dumps({"load_peak": load_peak, "footprint": footprint, "peak": status_kib("VmHWM"), "weights": weights,
                  "peak_is_the_runs": reset}))
"""


def measure_model_memory(model: Path, corpus: Path, tmp: Path, args) -> dict:
    """Peak RSS of profile() and of a bare forward over the same windows, each in a fresh process,
    against the loaded model's footprint (resident set once every weight was read)."""
    peaks = {mode: memory_child(mode, model, corpus, tmp, args) for mode in ("bare", "profile")}
    mib = {mode: {key: report[key] / 2**10 for key in ("load_peak", "footprint", "peak")} for mode, report in peaks.items()}
    weights = peaks["profile"]["weights"] / 2**20
    footprint = mib["profile"]["footprint"]
    return {
        "memory_model": model.name,
        "memory_weights_mib": round(weights, 1),
        "memory_load_peak_rss_mib": round(mib["profile"]["load_peak"], 1),
        "memory_footprint_mib": round(footprint, 1),
        "memory_bare_forward_peak_rss_mib": round(mib["bare"]["peak"], 1),
        "memory_peak_rss_mib": round(mib["profile"]["peak"], 1),
        "memory_peak_is_the_profiles": peaks["profile"]["peak_is_the_runs"],
        "memory_peak_over_footprint": round(mib["profile"]["peak"] / footprint, 2),
        "memory_peak_over_weights": round(mib["profile"]["peak"] / weights, 2),
        "memory_peak_over_bare_forward_peak": round(mib["profile"]["peak"] / mib["bare"]["peak"], 2),
        "memory_profile_added_mib": round(mib["profile"]["peak"] - footprint, 1),
    }


def memory_child(mode: str, model: Path, corpus: Path, tmp: Path, args) -> dict:
    command = [sys.executable, "-c", MEMORY_CHILD, mode, str(model), str(corpus), str(tmp / "memory-atlas"),
               args.label_field, str(args.whole_max_length)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the memory run ({mode}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    raise SystemExit(main())
