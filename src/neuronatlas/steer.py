"""Steer the language of generated text with language neurons (Language Arithmetics, Gurgurov et al. 2025).

During greedy ``generate()`` from source-language prompts, at every position:

* **deactivate** the source language's neurons: set them to ``deactivate_value`` (a constant);
* **activate** the target language's neurons: ``mode="add"`` adds ``strength`` x the target's mean
  activation from the atlas (a += lambda * mean_target; default lambda = 7, tuned on the bundled
  tiny-llama, where the paper's lambda = 1 is far too weak), ``mode="replace"`` sets them to it
  (a = mean_target), ``mode="diff"`` adds ``strength`` x (mean_target - mean of the other labels).

By default this acts on the gate signal ``g = act(gate(x))`` of gated families (what LAPE and the
paper use for Llama) and on ``z`` otherwise. A language identifier trained on a labelled corpus
(:mod:`neuronatlas.langid`, not the steered model) judges the language of each continuation; the
result reports the share of steered continuations in the target language (the *flip share*)
next to the same share without steering. Continuations with fewer than 4 distinct letters
(empty or degenerate output such as "dddddddd") get no language and never count as flipped.

    >>> result = steer(model, tokenizer, atlas, lape, "en", "de", prompts, langid=langid)  # doctest: +SKIP
    >>> result["flip_share"]                                                               # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .corpus import Corpus, read_corpus
from .errors import NeuronAtlasError
from .hooks import pad_token_id
from .intervene import Intervention, intervene
from .loading import model_fingerprint
from .models import check_causal, locate_neurons
from .neuronset import NeuronSet

MODES = ("add", "replace", "diff")
# Defaults tuned on the bundled tiny-llama with a LAPE set at top_rate 0.05 (docs/prove.md has the
# sweep): the paper's lambda = 1 flips almost nothing on a 4-layer model, lambda = 7 with the source
# neurons set to -2.5 (one of the paper's tried values) flipped every one of the 20 language pairs in
# at least half of the prompts. Greedy decoding with repetition penalty 1.1 as in the paper.
DEFAULT_DEACTIVATE = -2.5
DEFAULT_STRENGTH = 7.0
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_PROMPT_WORDS = 4
REPETITION_PENALTY = 1.1


def default_signal(model_neurons, atlas) -> str:
    return "gate" if model_neurons.gated and "gate" in atlas.signals else "z"


def prompts_from_corpus(corpus: str | Path | Corpus, label: str, count: int = 10,
                        words: int = DEFAULT_PROMPT_WORDS, label_field: str = "lang",
                        text_field: str = "text", skip: int = 0) -> list[str]:
    """The first ``words`` words of the first ``count`` documents of ``label`` (after ``skip`` of them)."""
    if isinstance(corpus, (str, Path)):
        corpus = read_corpus(corpus, text_field=text_field, label_field=label_field)
    if count < 1 or words < 1:
        raise NeuronAtlasError(f"prompts and prompt words must be at least 1 (got {count} and {words})")
    prompts, seen, labels = [], 0, set()
    for doc in corpus:
        labels.add(doc.label)
        if doc.label != label:
            continue
        seen += 1
        if seen <= skip:
            continue
        text = " ".join(doc.text.split()[:words])
        if text:
            prompts.append(text)
        if len(prompts) == count:
            break
    if not prompts:
        known = ", ".join(sorted(str(x) for x in labels if x is not None)) or "none"
        raise NeuronAtlasError(f"no documents of label {label!r} in corpus {corpus.path} (its labels: {known})")
    return prompts


def langid_for_atlas(atlas):
    """Train a language identifier on the labelled corpus the atlas was profiled on."""
    from .langid import train_langid

    info = atlas.meta.get("corpus", {})
    path = info.get("path")
    if not path or not Path(path).exists() or not info.get("label_field"):
        raise NeuronAtlasError(
            f"cannot train a language identifier: the atlas's corpus {path!r} is missing or unlabelled; "
            "pass langid=train_langid(corpus) (CLI: --langid FILE.npz or --langid-corpus FILE.jsonl)"
        )
    return train_langid(read_corpus(path, text_field=info.get("text_field", "text"),
                                    label_field=info["label_field"], format=info.get("format")))


def steering_interventions(neuron_set: NeuronSet, source: str, target: str, mode: str = "add",
                           deactivate_value: float | None = DEFAULT_DEACTIVATE, strength: float = DEFAULT_STRENGTH,
                           signal: str = "gate") -> list[Intervention]:
    """The Language Arithmetics interventions: deactivate ``source``, then activate ``target``."""
    if mode not in MODES:
        raise NeuronAtlasError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")
    for label, role in ((source, "source"), (target, "target")):
        if label not in neuron_set.labels:
            raise NeuronAtlasError(
                f"unknown {role} label {label!r}; the neuron set has labels: {', '.join(neuron_set.labels) or 'none'}"
            )
    if source == target:
        raise NeuronAtlasError(f"source and target are the same label {source!r}; steer to another language")
    items = []
    if deactivate_value is not None:
        items.append(Intervention(neuron_set.for_label(source), "constant", value=float(deactivate_value), signal=signal))
    op = {"add": "add_label_mean", "replace": "replace_label_mean", "diff": "diff_mean"}[mode]
    value = None if mode == "replace" else float(strength)
    items.append(Intervention(neuron_set.for_label(target), op, value=value, label=target, signal=signal))
    return items


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             batch_size: int = 16, repetition_penalty: float = REPETITION_PENALTY) -> list[str]:
    """Greedy continuations (new text only) of ``prompts``, left-padded in batches."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            ids = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                repetition_penalty=repetition_penalty, pad_token_id=pad,
            )
            new = ids[:, inputs["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def steer(
    model,
    tokenizer,
    atlas,
    neuron_set: NeuronSet,
    source: str,
    target: str,
    prompts: Sequence[str],
    mode: str = "add",
    deactivate_value: float | None = DEFAULT_DEACTIVATE,
    strength: float = DEFAULT_STRENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    signal: str | None = None,
    *,
    langid=None,
    batch_size: int = 16,
    repetition_penalty: float = REPETITION_PENALTY,
    check_fingerprint: bool = True,
) -> dict:
    """Generate from ``prompts`` with and without steering ``source`` -> ``target``; judge the languages.

    Returns a dict with ``flip_share`` (share of steered continuations the language identifier puts
    in ``target``), ``baseline_target_share`` (the same without steering), the source shares, the
    per-prompt ``examples`` and the parameters.
    """
    started = time.monotonic()
    check_causal(model.config, "steer", needs="text generation")
    neurons = locate_neurons(model)
    if not prompts:
        raise NeuronAtlasError("no prompts to steer from; give at least one")
    if isinstance(prompts, str):
        prompts = [prompts]
    signal = signal or default_signal(neurons, atlas)
    if max_new_tokens < 1:
        raise NeuronAtlasError(f"max new tokens must be at least 1 (got {max_new_tokens})")
    for label, role in ((source, "source"), (target, "target")):
        if label not in atlas.labels:
            raise NeuronAtlasError(f"unknown {role} label {label!r}; the atlas has labels: {', '.join(atlas.labels)}")
    items = steering_interventions(neuron_set, source, target, mode, deactivate_value, strength, signal)
    if check_fingerprint:
        _check_fingerprints(model, neurons, neuron_set, atlas)
    langid = _check_langid(langid, atlas, source, target)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, repetition_penalty=repetition_penalty)
    with intervene(neurons, items, atlas=atlas, allow_empty=False):  # validated before the plain run
        pass
    plain = generate(model, tokenizer, prompts, **kwargs)
    with intervene(neurons, items, atlas=atlas, allow_empty=False):
        steered = generate(model, tokenizer, prompts, **kwargs)
    result = _judge(langid, source, target, prompts, plain, steered)
    result["params"] = {
        "mode": mode, "deactivate_value": deactivate_value, "strength": strength, "signal": signal,
        "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty, "decoding": "greedy",
        "positions": "all",
        "neurons": {source: len(neuron_set.for_label(source)), target: len(neuron_set.for_label(target))},
    }
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def _check_fingerprints(model, neurons, neuron_set: NeuronSet, atlas) -> None:
    """The neuron set and the atlas must both come from ``model``."""
    fingerprint = model_fingerprint(model)
    neuron_set.check_model(fingerprint, neurons.widths)
    atlas_print = atlas.meta["model"].get("fingerprint")
    if atlas_print and atlas_print != fingerprint:
        raise NeuronAtlasError(
            f"the atlas was made for another model ({atlas.meta['model'].get('name_or_path')}, fingerprint "
            f"{atlas_print} vs {fingerprint}); profile this model to get its atlas"
        )


def _check_langid(langid, atlas, source: str, target: str):
    """The given language identifier (else one trained on the atlas's corpus), knowing both labels."""
    if langid is None:
        langid = langid_for_atlas(atlas)
    missing = [label for label in (source, target) if label not in langid.labels]
    if missing:
        raise NeuronAtlasError(
            f"the language identifier knows no {', '.join(map(repr, missing))} (it knows {', '.join(langid.labels)}); "
            "train it on a corpus with those labels"
        )
    return langid


def _judge(langid, source: str, target: str, prompts, plain: list[str], steered: list[str]) -> dict:
    """The shares of plain and steered continuations in each language, and the examples."""
    plain_lang, steered_lang = _languages(langid, plain), _languages(langid, steered)
    n = len(prompts)

    def share(langs, label):
        return sum(lang == label for lang in langs) / n

    return {
        "kind": "steering",
        "source": source,
        "target": target,
        "prompts": n,
        "flip_share": share(steered_lang, target),
        "baseline_target_share": share(plain_lang, target),
        "source_share_plain": share(plain_lang, source),
        "source_share_steered": share(steered_lang, source),
        "unjudged_share_steered": share(steered_lang, None),
        "unjudged_share_plain": share(plain_lang, None),
        "steered_languages": _counts(steered_lang),
        "plain_languages": _counts(plain_lang),
        "examples": [
            {"prompt": p, "plain": a, "plain_lang": la, "steered": b, "steered_lang": lb}
            for p, a, la, b, lb in zip(prompts, plain, plain_lang, steered, steered_lang)
        ],
    }


MIN_DISTINCT_LETTERS = 4


def judgeable(text: str) -> bool:
    """Whether a continuation is text a language can be read from: at least 4 distinct letters.

    Degenerate output ("dddddddd", "....", an empty string) is not judged, so it never counts as a
    flip, whatever the language identifier would guess for it.
    """
    return len({ch.lower() for ch in text if ch.isalpha()}) >= MIN_DISTINCT_LETTERS


def _languages(langid, texts: list[str]) -> list[str | None]:
    """The language of each text; None for an empty or degenerate continuation."""
    langs: list[str | None] = [None] * len(texts)
    filled = [i for i, text in enumerate(texts) if judgeable(text)]
    if filled:
        for i, lang in zip(filled, langid.predict([texts[i] for i in filled])):
            langs[i] = lang
    return langs


def _counts(langs: list[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for lang in langs:
        key = lang if lang is not None else "(none)"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def format_steering(result: dict, examples: int = 3) -> str:
    """A few examples and the flip share, as the CLI prints them."""
    src, tgt = result["source"], result["target"]
    p = result["params"]
    lines = [f"steering {src} -> {tgt} (mode {p['mode']}, strength {p['strength']}, deactivate {p['deactivate_value']}, "
             f"signal {p['signal']}, {p['max_new_tokens']} new tokens, {result['prompts']} prompts)"]
    for example in result["examples"][:examples]:
        lines.append(f"  prompt : {example['prompt']!r}")
        lines.append(f"  plain  : [{example['plain_lang']}] {example['plain']!r}")
        lines.append(f"  steered: [{example['steered_lang']}] {example['steered']!r}")
    lines.append(
        f"flip share: {result['flip_share']:.0%} of steered continuations in {tgt} "
        f"(without steering: {result['baseline_target_share']:.0%}); in {src}: "
        f"{result['source_share_steered']:.0%} steered vs {result['source_share_plain']:.0%} plain"
    )
    lines.append("steered languages: " + ", ".join(f"{k} {v}" for k, v in result["steered_languages"].items()))
    return "\n".join(lines)


__all__ = ["steer", "steering_interventions", "prompts_from_corpus", "generate", "format_steering", "langid_for_atlas"]
