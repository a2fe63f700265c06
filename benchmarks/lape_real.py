"""LAPE at the paper's settings on a real model: SmolLM2-135M, the bundled 5-language corpus.

    python benchmarks/lape_real.py --out /tmp/lape_real [--docs 40] [--eval-docs 20] [--atlas ATLAS]

1. profile SmolLM2-135M-Instruct (the GGUF of ``real_model_path("smollm2-135m")``) over the first
   ``--docs`` training documents per language (``--max-length 128``), or reuse ``--atlas``;
2. ``find_lape(atlas, top_rate=0.01)``: the paper's default top rate (on the gate signal);
3. ``evaluate`` on the first ``--eval-docs`` held-out documents per language with 5 random
   controls, timed; then the same conditions one per forward and several per forward on
   ``--timing-docs`` documents, to time the batching;
4. ``steer`` for ``--pairs`` (default de:en, en:es, ru:en) with the strength searched on the first
   10 held-out documents of the source language and reported on the next ``--prompts``.

Writes ``results.json`` and ``results.md`` (the tables docs/prove.md quotes) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from neuronatlas import bundled
from neuronatlas.evaluate import evaluate, to_markdown
from neuronatlas.loading import load_model
from neuronatlas.methods import find_lape
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
                    options=ProfileOptions(max_length=MAX_LENGTH, top_k=0, batch_size=16, positions=False,
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
    parser.add_argument("--skip", nargs="*", default=[], choices=["evaluate", "steer"],
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
               "profile_tokens": atlas.summary()["tokens"], "train_docs_per_language": args.docs}
    print(json.dumps(summary), flush=True)
    evaluation, times, steered = None, {}, []
    if "evaluate" not in args.skip:
        evaluation = evaluate(model, tokenizer, lape, bundled.CORPUS_HELDOUT, controls=5, label_field="lang",
                              max_docs_per_label=args.eval_docs, max_length=MAX_LENGTH, quiet=False)
        print(to_markdown(evaluation), f"evaluate: {evaluation['seconds']:.1f} s", flush=True)
        times = timing(model, tokenizer, lape, args.timing_docs) if args.timing_docs else {}
    if "steer" not in args.skip:
        steered = steering(model, tokenizer, atlas, lape, args.pairs, args.prompts)
    results = {"summary": summary, "evaluation": evaluation, "timing": times, "steering": steered}
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    (args.out / "results.md").write_text(markdown(summary, evaluation, steered))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
