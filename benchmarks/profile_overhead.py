#!/usr/bin/env python3
"""How much profiling costs: throughput against a bare forward, and peak memory against corpus length.

1. Throughput. The same pre-built batches (``iter_windows`` / ``iter_batches`` on a corpus) go, in
   one process, through a bare Hugging Face forward of the base model and through the profiler's
   step (``_ProfileRun.step``: the same forward plus the statistics), alternating bare, profiled,
   bare, profiled ... batch by batch, for several rounds after an untimed warm-up round; the report
   gives the medians over rounds and the ratio profiled / bare tokens per second (goal: >= 0.9),
   and how much of the profiled time went to the hooks and, within them, to the statistics.
   Every round takes new batches, so the statistics grow as in a real profile. The default model
   is a randomly initialised Llama of a realistic shape (hidden 1024, intermediate 2816, 4 layers,
   vocab 32000); batches of 4 windows of 256 tokens, from the corpus with consecutive documents
   of a label joined (``--pack-tokens``) so that windows are full. The bundled tiny model, when
   present, gives a second line: there the forward is so cheap that the statistics are a much
   larger share of the cost. On a busy machine the ratio moves by a few hundredths from run to
   run: compare the per-round lines.
2. Memory. The real CLI (``python -m neuronatlas profile ...``) runs in child processes on the
   corpus 1x and 4x long (the documents repeated); each child's peak RSS is read by a fresh wrapper
   process with ``getrusage(RUSAGE_CHILDREN)`` (goal: 4x / 1x <= 1.1).

    python benchmarks/profile_overhead.py                     # a few minutes on 2 CPU cores
    python benchmarks/profile_overhead.py --model PATH --json overhead.json
    python benchmarks/profile_overhead.py --rounds 3 --skip-memory

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

import neuronatlas.profile as profile_module
from neuronatlas.bundled import CORPUS_TRAIN, ROOT as BUNDLED_ROOT
from neuronatlas.corpus import iter_batches, iter_windows, read_corpus
from neuronatlas.loading import load_model, max_positions
from neuronatlas.models import locate_neurons
from neuronatlas.profile import ProfileOptions, _metadata, _ProfileRun
from neuronatlas.stats import SignalStats

TINY_LLAMA = BUNDLED_ROOT / "models" / "tiny-llama"

# Runs the command given as arguments, then prints its peak RSS: a fresh process per measurement,
# so RUSAGE_CHILDREN sees that one child only.
RSS_WRAPPER = """
import json, resource, subprocess, sys, time
started = time.monotonic()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"returncode": done.returncode, "maxrss": peak, "seconds": time.monotonic() - started,
                  "stderr": done.stderr[-2000:]}))
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, object] = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="profile-overhead-") as tmp:
        tmp = Path(tmp)
        tokenizer_source = TINY_LLAMA if (TINY_LLAMA / "tokenizer.json").exists() else None
        corpus = Path(args.corpus)
        if args.pack_tokens:
            corpus = pack_corpus(corpus, tmp / "packed.jsonl", args.text_field, args.label_field, args.pack_tokens)
        if args.model:
            model_path, model_name = Path(args.model), args.model
        else:
            model_path = tmp / "random-llama"
            model_name = build_random_llama(model_path, args.hidden, args.intermediate, args.layers, args.heads,
                                            args.vocab, tokenizer_source, Path(args.corpus), args.text_field)
        say(f"throughput: {model_name}")
        main_result = measure_throughput(model_path, corpus, args, args.batch_size, args.max_length)
        results.update(model=model_name, **main_result)

        if not args.skip_tiny and TINY_LLAMA.exists() and (args.model is None or Path(args.model) != TINY_LLAMA):
            say(f"throughput: bundled {TINY_LLAMA.name}")
            tiny = measure_throughput(TINY_LLAMA, corpus, args, args.batch_size, args.max_length)
            results.update({f"tiny_{key}": value for key, value in tiny.items() if key != "rounds"})
            results["tiny_note"] = ("the tiny model's forward is so cheap that the statistics are a much larger "
                                    "share of its cost; the ratio that matters is the realistic model's")
        elif not args.skip_tiny:
            results["tiny_model"] = f"not found ({TINY_LLAMA})"

        if not args.skip_memory:
            if args.memory_model:
                memory_model, memory_name = Path(args.memory_model), args.memory_model
            elif TINY_LLAMA.exists():
                memory_model, memory_name = TINY_LLAMA, f"bundled {TINY_LLAMA.name}"
            else:
                memory_model = tmp / "small-llama"
                memory_name = build_random_llama(memory_model, 256, 704, 4, 4, args.vocab, tokenizer_source,
                                                 Path(args.corpus), args.text_field)
            say(f"memory: {memory_name} on {args.memory_docs} and {4 * args.memory_docs} documents")
            results.update(measure_memory(memory_model, memory_name, Path(args.corpus), tmp, args))

    print()
    for key, value in results.items():
        if key != "rounds":
            print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local model folder (default: a random Llama of the shape below)")
    parser.add_argument("--hidden", type=int, default=1024, help="random model: hidden size (default: 1024)")
    parser.add_argument("--intermediate", type=int, default=2816, help="random model: FFN width (default: 2816)")
    parser.add_argument("--layers", type=int, default=4, help="random model: layers (default: 4)")
    parser.add_argument("--heads", type=int, default=16, help="random model: attention heads (default: 16)")
    parser.add_argument("--vocab", type=int, default=32000, help="random model: vocabulary size (default: 32000)")
    parser.add_argument("--corpus", default=str(CORPUS_TRAIN), help="a jsonl corpus (default: the bundled train.jsonl)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="lang")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per batch (default: 4)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per window (default: 256)")
    parser.add_argument("--pack-tokens", type=int, default=1024,
                        help="join consecutive documents of one label until about this many tokens, so windows "
                             "are full as in a corpus of long documents; 0 = use the documents as they are "
                             "(default: 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of bare + profiled (default: 5)")
    parser.add_argument("--batches", type=int, default=2, help="batches per round (default: 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-tiny", action="store_true", help="skip the bundled tiny model")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak memory runs")
    parser.add_argument("--memory-model", help="model for the memory runs (default: the bundled tiny model, "
                                               "else a small random Llama)")
    parser.add_argument("--memory-docs", type=int, default=400, help="documents in the 1x memory corpus (default: 400)")
    parser.add_argument("--memory-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the memory runs, 0 = inherit (default: 1: on a busy machine a "
                             "small model runs several times faster on one thread; peak memory hardly changes)")
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


@contextlib.contextmanager
def timers(seconds: dict[str, float]):
    """Adds the wall time of the profiler's hook callbacks to ``seconds["hooks"]`` (selecting the
    real tokens, then the statistics) and of ``SignalStats.update`` to ``seconds["stats"]``."""
    update, capture = SignalStats.update, profile_module.capture

    def timed(function, key):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - started

        return call

    def timed_capture(neurons, on_activation=None, on_gate=None):
        return capture(neurons, on_activation and timed(on_activation, "hooks"), on_gate and timed(on_gate, "hooks"))

    SignalStats.update, profile_module.capture = timed(update, "stats"), timed_capture
    try:
        yield
    finally:
        SignalStats.update, profile_module.capture = update, capture


def measure_throughput(model_path: Path, corpus_path: Path, args, batch_size: int, max_length: int) -> dict:
    model, tokenizer = load_model(str(model_path), device="cpu")
    neurons = locate_neurons(model)
    corpus = read_corpus(corpus_path, text_field=args.text_field, label_field=args.label_field)
    options = ProfileOptions(batch_size=batch_size, max_length=min(max_length, max_positions(model.config) or max_length))
    meta = _metadata(model, tokenizer, neurons, corpus, corpus.validate(), options)
    run = _ProfileRun(neurons, tokenizer, corpus, meta, options)
    base = run.base
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    needed = (args.rounds + 1) * args.batches  # one untimed warm-up round first
    batches = list(islice(iter_batches(iter_windows(corpus, tokenizer, options.max_length), batch_size, pad), needed))
    if len(batches) < needed:
        raise SystemExit(f"the corpus gives {len(batches)} batches, {needed} needed: lower --rounds or --batches")

    def bare(batch) -> None:
        mask = batch.attention_mask.bool()
        kwargs = {"input_ids": batch.input_ids, "attention_mask": mask.long(), "use_cache": False}
        if run.takes_positions:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        base(**kwargs)

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


# ---- memory -------------------------------------------------------------------------------------


def measure_memory(model: Path, model_name: str, corpus: Path, tmp: Path, args) -> dict:
    with corpus.open(encoding="utf-8") as handle:
        lines = [line if line.endswith("\n") else line + "\n" for line in islice(handle, args.memory_docs)]
    one, four = tmp / "memory-1x.jsonl", tmp / "memory-4x.jsonl"
    one.write_text("".join(lines), encoding="utf-8")
    four.write_text("".join(lines) * 4, encoding="utf-8")
    peaks = {}
    for name, path in (("1x", one), ("4x", four)):
        command = [sys.executable, "-m", "neuronatlas", "profile", "--model", str(model), "--corpus", str(path),
                   "--text-field", args.text_field, "--label-field", args.label_field, "--out", str(tmp / f"atlas-{name}"),
                   "--quiet", "--device", "cpu"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.memory_threads)) if args.memory_threads else None
        done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], capture_output=True, text=True,
                              check=True, env=env)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        if report["returncode"] != 0:
            raise SystemExit(f"the profile of the {name} corpus failed:\n{report['stderr']}")
        peaks[name] = report["maxrss"] / (2**20 if sys.platform == "darwin" else 2**10)  # MiB
        say(f"  {name}: {len(lines) * (4 if name == '4x' else 1)} documents, peak RSS {peaks[name]:,.0f} MiB, "
            f"{report['seconds']:.0f} s")
    return {
        "memory_model": model_name,
        "memory_corpus": f"first {len(lines)} documents of {corpus.name}, and them repeated 4 times",
        "peak_rss_1x_mib": round(peaks["1x"], 1),
        "peak_rss_4x_mib": round(peaks["4x"], 1),
        "peak_rss_ratio_4x_1x": round(peaks["4x"] / peaks["1x"], 3),
    }


if __name__ == "__main__":
    raise SystemExit(main())
