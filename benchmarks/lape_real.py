"""LAPE at the paper's settings on a real model: SmolLM2-135M, the bundled 5-language corpus.

    python benchmarks/lape_real.py --out /tmp/lape_real [--docs 40] [--eval-docs 20] [--atlas ATLAS]

1. profile SmolLM2-135M-Instruct (the GGUF of ``real_model_path("smollm2-135m")``) over the first
   ``--docs`` training documents per language (``--max-length 128``), or reuse ``--atlas``;
2. ``find_lape(atlas, top_rate=0.01)``: the paper's default top rate (on the gate signal);
3. ``evaluate`` on the first ``--eval-docs`` held-out documents per language with 5 random
   controls, timed; then the same conditions one per forward and several per forward on
   ``--timing-docs`` documents, to time the batching;
4. ``steer`` for ``--pairs`` (default de:en, en:es, ru:en) with the strength searched on the first
   10 held-out documents of the source language and reported on the next ``--prompts``;
5. ``diagnose`` (on the first ``--diagnose-docs`` held-out documents per language): how the labels'
   sets overlap, and the NLL increase on every language's text when only a label's *exclusive*
   neurons (assigned to that label alone) or only the neurons two labels share (``--shared``) are
   zeroed, split by predicted token: a whole character/word piece, or a byte fragment of a
   character (a token that decodes to U+FFFD on its own). Also the set of ``--signal-check``
   zeroed on the gate signal and on z (the same model by construction: z = act(gate(x)) * up(x)),
   and the sets of ``--tails`` zeroed only where the gate signal is positive (the neuron active) or
   only where it is negative (SiLU's tail, where the neuron counts as inactive).

Writes ``results.json`` and ``results.md`` (the tables docs/prove.md quotes) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from neuronatlas import bundled
from neuronatlas.corpus import read_corpus
from neuronatlas.evaluate import evaluate, to_markdown
from neuronatlas.hooks import forward_batch, hook_sites
from neuronatlas.intervene import Intervention, intervene
from neuronatlas.loading import load_model
from neuronatlas.methods import find_lape
from neuronatlas.models import locate_neurons
from neuronatlas.real_models import real_model_path
from neuronatlas.steer import format_steering, prompts_from_corpus, steer

MAX_LENGTH = 128


def get_atlas(args, model_path: Path):
    from neuronatlas.atlas import load_atlas
    from neuronatlas.profile import ProfileOptions, profile

    if args.atlas:
        return load_atlas(args.atlas), None
    train = bundled.first_per_label(bundled.CORPUS_TRAIN, args.out / "train.jsonl", args.docs)
    started = time.monotonic()
    atlas = profile(str(model_path), train, args.out / "atlas", label_field="lang", device="cpu", overwrite=True,
                    quiet=False, options=ProfileOptions(max_length=MAX_LENGTH, top_k=0, batch_size=16, positions=False,
                                           doc_sample=0, exemplar_radius=0))
    return atlas, round(time.monotonic() - started, 1)


def timing(model, tokenizer, lape, docs: int) -> dict:
    """evaluate's run time with one condition per forward (as before) and with several."""
    out = {}
    for name, per_forward in (("one condition per forward", 1), ("several per forward (auto)", None)):
        result = evaluate(model, tokenizer, lape, bundled.CORPUS_HELDOUT, controls=5, label_field="lang",
                          max_docs_per_label=docs, max_length=MAX_LENGTH, conditions_per_forward=per_forward)
        out[name] = result["seconds"]
        print(f"evaluate, {name}: {result['seconds']:.1f} s ({docs} documents per language)", flush=True)
    return out


def steering(model, tokenizer, atlas, lape, pairs, prompts: int) -> list[dict]:
    results = []
    for pair in pairs:
        source, target = pair.split(":")
        calibration = prompts_from_corpus(bundled.CORPUS_HELDOUT, source, count=10)
        held_out = prompts_from_corpus(bundled.CORPUS_HELDOUT, source, count=prompts, skip=10)
        result = steer(model, tokenizer, atlas, lape, source, target, held_out, calibration_prompts=calibration)
        print(format_steering(result, examples=3), flush=True)
        results.append(result)
    return results


def overlap(lape) -> dict:
    """{label: {other label: neurons the two share}} (the diagonal: the label's own count)."""
    owners = defaultdict(set)
    for neuron in lape.neurons:
        owners[(neuron.layer, neuron.index)].add(neuron.label)
    table = {a: {b: 0 for b in lape.labels} for a in lape.labels}
    for labels in owners.values():
        for a in labels:
            for b in labels:
                table[a][b] += 1
    return table


def subsets(lape, pairs: list[str]) -> dict[str, dict[int, torch.Tensor]]:
    """{name: {layer: indices}}: each label's exclusive neurons, and the neurons each pair "a:b" shares."""
    owners = defaultdict(set)
    for neuron in lape.neurons:
        owners[(neuron.layer, neuron.index)].add(neuron.label)
    groups = defaultdict(list)
    for key, labels in owners.items():
        if len(labels) == 1:
            groups[f"{next(iter(labels))} only"].append(key)
        for a in labels:
            for b in labels:
                if a < b:
                    groups[f"{a} & {b}"].append(key)
    wanted = {" & ".join(sorted(pair.split(":"))) for pair in pairs}
    chosen = {name: keys for name, keys in groups.items() if name.endswith("only") or name in wanted}
    return {name: per_layer(keys) for name, keys in sorted(chosen.items())}


def per_layer(keys) -> dict[int, torch.Tensor]:
    table = defaultdict(list)
    for layer, index in keys:
        table[layer].append(index)
    return {layer: torch.tensor(sorted(indices)) for layer, indices in sorted(table.items())}


@torch.inference_mode()
def token_nll(model, batches, condition) -> list[torch.Tensor]:
    """Per batch: (B, T-1) NLL of each next token (0 at padding) inside the context ``condition()``."""
    out = []
    with condition():
        for batch in batches:
            logits = forward_batch(model, batch.input_ids, batch.attention_mask).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
            out.append(nll * (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]))
    return out


def fragment_mask(tokenizer, batch) -> torch.Tensor:
    """(B, T-1) bool: the predicted token is a byte fragment (it decodes to U+FFFD on its own)."""
    ids = batch.input_ids[:, 1:]
    pieces = {int(i): "\ufffd" in tokenizer.decode([int(i)]) for i in ids.unique()}
    return torch.tensor([[pieces[int(i)] for i in row] for row in ids])


def zeroed(model, table: dict[int, torch.Tensor], signal: str):
    """(context factory, neuron count): the neurons of ``table`` zeroed on ``signal``."""
    items = [Intervention(table, "zero", signal=signal)]
    return (lambda: intervene(model, items)), sum(len(v) for v in table.values())


def clamped(model, table: dict[int, torch.Tensor], min: float | None = None, max: float | None = None):
    """(context factory, neuron count): the gate signal of ``table``'s neurons clamped to [min, max].

    max=0 removes only the positive part (where the neuron is active); min=0 only the negative
    tail of SiLU (where it is inactive); together they are the full zeroing.
    """
    neurons = locate_neurons(model)

    def edit(layer: int, g: torch.Tensor) -> torch.Tensor:
        index = table[layer].to(g.device)
        g = g.clone()
        g[..., index] = g[..., index].clamp(min=min, max=max)
        return g

    return (lambda: hook_sites(neurons, after_act=edit, layers=sorted(table))), sum(len(v) for v in table.values())


def diagnose(model, tokenizer, lape, docs: int, signal_check: str, pairs: list[str], tails: list[str]) -> dict:
    """Exclusive/shared subsets zeroed on each language's text; NLL increases split by token kind."""
    from neuronatlas.evaluate import _label_batches

    batches, _, tokens = _label_batches(read_corpus(bundled.CORPUS_HELDOUT, label_field="lang"), tokenizer, docs,
                                        MAX_LENGTH, 8)
    real = {label: [(b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).bool() for b in bs]
            for label, bs in batches.items()}  # (B, T-1) per batch: predicted real tokens
    fragment = {label: [fragment_mask(tokenizer, b) & r for b, r in zip(bs, real[label])]
                for label, bs in batches.items()}
    started = time.monotonic()
    clean = {label: token_nll(model, bs, nullcontext) for label, bs in batches.items()}
    conditions = {name: zeroed(model, table, lape.signal) for name, table in subsets(lape, pairs).items()}
    check = lape.for_label(signal_check).per_layer()
    conditions[f"{signal_check} (all its neurons), gate zeroed"] = zeroed(model, check, "gate")
    conditions[f"{signal_check} (all its neurons), z zeroed"] = zeroed(model, check, "z")
    for label in tails:
        table = lape.for_label(label).per_layer()
        conditions[f"{label}, gate zeroed only where > 0"] = clamped(model, table, max=0.0)
        conditions[f"{label}, gate zeroed only where < 0"] = clamped(model, table, min=0.0)
    rows = {}
    for name, (condition, count) in conditions.items():
        row = {}
        for label, bs in batches.items():
            ablated = token_nll(model, bs, condition)
            delta = [a - c for a, c in zip(ablated, clean[label])]
            row[label] = {kind: mean_over(delta, masks) for kind, masks in
                          (("all", real[label]), ("fragment", fragment[label]),
                           ("whole", [r & ~f for r, f in zip(real[label], fragment[label])]))}
        rows[name] = {"neurons": count, "delta": row}
        print(name, json.dumps({k: round(v["all"], 4) for k, v in row.items()}), flush=True)
    shares = {label: round(sum(int(f.sum()) for f in fragment[label]) / tokens[label], 3) for label in batches}
    return {"overlap": overlap(lape), "fragment_share": shares, "tokens": tokens, "rows": rows,
            "seconds": round(time.monotonic() - started, 1)}


def mean_over(values: list[torch.Tensor], masks: list[torch.Tensor]) -> float | None:
    total = sum(float(v[m].sum()) for v, m in zip(values, masks))
    count = sum(int(m.sum()) for m in masks)
    return total / count if count else None


def diagnosis_markdown(diagnosis: dict) -> str:
    """The subset table: NLL increase on each language's text, all tokens (fragments only)."""
    labels = sorted(diagnosis["tokens"])
    lines = ["| zeroed \\ text | neurons | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for name, row in diagnosis["rows"].items():
        cells = []
        for label in labels:
            cell = row["delta"][label]
            fragment = "" if cell["fragment"] is None else f" ({cell['fragment']:+.3f})"
            cells.append(f"{cell['all']:+.4f}{fragment}")
        lines.append(f"| {name} | {row['neurons']} | " + " | ".join(cells) + " |")
    shares = ", ".join(f"{label} {share:.1%}" for label, share in diagnosis["fragment_share"].items())
    return "\n".join(lines) + f"\n\nByte-fragment share of predicted tokens: {shares}.\n"


def markdown(summary: dict, evaluation: dict, steered: list[dict]) -> str:
    lines = [f"LAPE at top rate 1% on {summary['model']}: {summary['neurons']} neurons "
             f"({summary['per_label']}), signal {summary['signal']}.", "", to_markdown(evaluation) if evaluation else "", "",
             "| steering | strength (searched) | calibration flip | held-out flip | without steering | "
             "median perplexity steered / plain |", "|---|---:|---:|---:|---:|---:|"]
    for r in steered:
        search, ppl = r["strength_search"], r["perplexity"]
        lines.append(f"| {r['source']} → {r['target']} | {r['params']['strength']:g}"
                     f"{'' if search['reached'] else ' (target not reached)'} | {search['calibration_flip_share']:.0%} | "
                     f"{r['flip_share']:.0%} | {r['baseline_target_share']:.0%} | "
                     f"{ppl['steered'] or float('nan'):.1f} / {ppl['plain'] or float('nan'):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lape-real"))
    parser.add_argument("--atlas", default=None, help="reuse this atlas instead of profiling")
    parser.add_argument("--docs", type=int, default=40, help="training documents per language to profile")
    parser.add_argument("--eval-docs", type=int, default=20, help="held-out documents per language to evaluate on")
    parser.add_argument("--timing-docs", type=int, default=5, help="documents per language of the timing comparison")
    parser.add_argument("--pairs", nargs="*", default=["de:en", "en:es", "ru:en"])
    parser.add_argument("--prompts", type=int, default=20, help="held-out prompts per steering pair")
    parser.add_argument("--diagnose-docs", type=int, default=4, help="held-out documents per language of diagnose")
    parser.add_argument("--signal-check", default="ar", help="the label whose set diagnose also zeroes on z")
    parser.add_argument("--shared", nargs="*", default=["ar:ru"],
                        help="label pairs whose shared neurons diagnose zeroes (default: ar:ru)")
    parser.add_argument("--tails", nargs="*", default=["ar", "en"],
                        help="labels whose set diagnose zeroes only where the gate is > 0, and only where < 0")
    parser.add_argument("--skip", nargs="*", default=[], choices=["evaluate", "steer", "diagnose"],
                        help="stages to leave out (e.g. to run them as two processes)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = real_model_path("smollm2-135m")
    if model_path is None:
        raise SystemExit("SmolLM2-135M is not fetched (make real-models)")
    atlas, profile_seconds = get_atlas(args, model_path)
    lape = find_lape(atlas, top_rate=0.01)
    lape.save(args.out / "lape.json")
    model, tokenizer = load_model(str(model_path), device="cpu", quiet=True)
    per_label = {label: len(lape.for_label(label)) for label in atlas.labels}
    summary = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "neurons": len(lape), "per_label": per_label,
               "signal": getattr(lape, "signal", None), "profile_seconds": profile_seconds,
               "profile_tokens": atlas.summary()["tokens"], "profile_documents": atlas.summary()["documents"]}
    print(json.dumps(summary), flush=True)
    evaluation, times, steered = None, {}, []
    if "evaluate" not in args.skip:
        evaluation = evaluate(model, tokenizer, lape, bundled.CORPUS_HELDOUT, controls=5, label_field="lang",
                              max_docs_per_label=args.eval_docs, max_length=MAX_LENGTH, quiet=False)
        print(to_markdown(evaluation), f"evaluate: {evaluation['seconds']:.1f} s", flush=True)
        times = timing(model, tokenizer, lape, args.timing_docs) if args.timing_docs else {}
    if "steer" not in args.skip:
        steered = steering(model, tokenizer, atlas, lape, args.pairs, args.prompts)
    diagnosis = None
    if "diagnose" not in args.skip:
        diagnosis = diagnose(model, tokenizer, lape, args.diagnose_docs, args.signal_check, args.shared,
                              args.tails)
    results = {"summary": summary, "evaluation": evaluation, "timing": times, "steering": steered,
               "diagnosis": diagnosis}
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    text = markdown(summary, evaluation, steered) + ("\n" + diagnosis_markdown(diagnosis) if diagnosis else "")
    (args.out / "results.md").write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
