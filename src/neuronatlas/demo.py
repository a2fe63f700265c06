"""``neuronatlas demo``: the whole pipeline on the bundled tiny model and corpus.

profile (train split) -> find LAPE neurons -> evaluate them against random controls on the held-out
split -> steer one language into another. Everything lands in one folder a person can open.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import bundled
from .summary import print_summary

# The bundled models have only 1,536-2,048 FFN neurons, so LAPE's default 1% keeps one to six
# neurons per language; 5% (the top of the paper's 1-5% sweep) gives each language a real set.
DEMO_TOP_RATE = 0.05
DEMO_DOCS_PER_LABEL = 30  # held-out documents per language for the evaluation
DEMO_TRAIN_PER_LABEL = 300  # training documents per language to profile (about 1/4 of the split)
STEER_FROM, STEER_TO = "de", "en"


def run_demo(model: str = "tiny-llama", out: str | Path = "neuronatlas-demo", quiet: bool = False) -> None:
    from .evaluate import format_matrix, plot_heatmap, to_markdown
    from .evaluate import evaluate as evaluate_sets
    from .loading import load_model
    from .methods.lape import find_lape
    from .profile import ProfileOptions, profile
    from .steer import format_steering, prompts_from_corpus, steer

    out = Path(out)
    model_path = str(bundled.model_path(model) if model in bundled.MODELS else model)
    corpus = bundled.first_per_label(bundled.CORPUS_TRAIN, out / "corpus.jsonl", DEMO_TRAIN_PER_LABEL)
    _say(f"1. profile {model} on {DEMO_TRAIN_PER_LABEL} bundled documents per language into {out / 'atlas'}")
    atlas = profile(model_path, corpus, out / "atlas", text_field=bundled.TEXT_FIELD, label_field=bundled.LABEL_FIELD,
                    options=ProfileOptions(batch_size=32), device="cpu", overwrite=True, quiet=quiet)
    print_summary(atlas.summary())

    _say(f"2. find language-specific neurons (LAPE, top rate {DEMO_TOP_RATE})")
    neuron_set = find_lape(atlas, top_rate=DEMO_TOP_RATE)
    neuron_set.save(out / "lape.json")
    print("neurons per language: " + ", ".join(f"{label} {len(neuron_set.for_label(label))}" for label in neuron_set.labels))

    _say(f"3. ablate each language's neurons; NLL on held-out text ({DEMO_DOCS_PER_LABEL} documents per language)")
    model_obj, tokenizer = load_model(model_path, device="cpu", quiet=True)
    result = evaluate_sets(model_obj, tokenizer, neuron_set, bundled.CORPUS_HELDOUT, controls=5,
                           max_docs_per_label=DEMO_DOCS_PER_LABEL, atlas=atlas, label_field=bundled.LABEL_FIELD)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(to_markdown(result))
    plot_heatmap(result, out / "eval.png")
    print(format_matrix(result))

    if STEER_FROM in neuron_set.labels and STEER_TO in neuron_set.labels:
        _say(f"4. steer {STEER_FROM} -> {STEER_TO} while generating from {STEER_FROM} prompts")
        # the strength is searched on 10 calibration prompts; the 10 after them are the ones reported
        calibration = prompts_from_corpus(bundled.CORPUS_HELDOUT, STEER_FROM, count=10, label_field=bundled.LABEL_FIELD)
        prompts = prompts_from_corpus(bundled.CORPUS_HELDOUT, STEER_FROM, count=10, label_field=bundled.LABEL_FIELD,
                                      skip=len(calibration))
        steering = steer(model_obj, tokenizer, atlas, neuron_set, STEER_FROM, STEER_TO, prompts,
                         calibration_prompts=calibration)
        print(format_steering(steering, examples=1))
    print(f"\nwritten to {out}: corpus.jsonl, atlas/, lape.json, eval.json, eval.md, eval.png")


def _say(text: str) -> None:
    print(f"\n== {text}")
