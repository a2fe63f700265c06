"""Steer the language of generated text with language neurons (Language Arithmetics, Gurgurov et al. 2025).

During greedy ``generate()`` from source-language prompts, at every position:

* **deactivate** the source language's neurons: set them to ``deactivate_value`` (a constant);
* **activate** the target language's neurons: ``mode="add"`` adds ``strength`` x the target's mean
  activation from the atlas (a += lambda * mean_target), ``mode="replace"`` sets them to it
  (a = mean_target), ``mode="diff"`` adds ``strength`` x (mean_target - mean of the other labels).

The strength is not tuned by hand per model: ``strength="auto"`` (the default) searches a grid
(:data:`STRENGTH_GRID`) on *calibration* prompts, distinct from the prompts the result reports,
and keeps the smallest strength whose calibration flip share reaches ``target_flip`` while the
steered text stays fluent (its median perplexity under the unsteered model at most
``FLUENCY_FACTOR`` x that of the unsteered continuations); if none does, the fluent strength with
the highest flip share (see :func:`search_steering`). The deactivation value is searched the same
way with ``deactivate_value="auto"`` (the default), in the order of :data:`DEACTIVATE_GRID`: the
paper's -2.5 first, then 0 (silence), then none (activation alone). A constant far below what the
activation function gives (SiLU's minimum is -0.28) can break the text of a model: measured on
SmolLM2-135M, en->es flipped 15% of continuations at -2.5 and 85% at 0. The chosen strength is then reported on the
held-out prompts, with the perplexity of the steered and the plain continuations next to the flip share.

It acts on the signal the neuron set was selected on (``neuron_set.signal``; LAPE: the gate
signal ``g = act(gate(x))`` of gated families), else gate where the model has one, else ``z``.
A maintained language identifier (:mod:`neuronatlas.langid`: py3langid, not the steered model)
judges the language of each continuation; the result reports the share of steered continuations
in the target language (the *flip share*) next to the same share without steering.
Continuations with fewer than 4 distinct letters (empty or degenerate output such as "dddddddd")
get no language and never count as flipped.

    >>> calibration = prompts_from_corpus("heldout.jsonl", "de", count=10)            # doctest: +SKIP
    >>> prompts = prompts_from_corpus("heldout.jsonl", "de", count=20, skip=10)       # doctest: +SKIP
    >>> result = steer(model, tokenizer, atlas, lape, "de", "en", prompts, calibration_prompts=calibration)  # doctest: +SKIP
    >>> result["flip_share"], result["perplexity"]["steered"]                       # doctest: +SKIP
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .corpus import Corpus, read_corpus
from .errors import NeuronAtlasError
from .hooks import forward_batch, pad_token_id
from .intervene import Intervention, intervene
from .langid import language_identifier
from .loading import model_fingerprint
from .models import check_causal, locate_neurons
from .neuronset import NeuronSet

MODES = ("add", "replace", "diff")
# The paper's deactivation value -2.5 (one of those it tried) is tried first; greedy decoding with
# repetition penalty 1.1 as in the paper. Strength and deactivation come from a search on calibration
# prompts (below).
PAPER_DEACTIVATE = -2.5
DEACTIVATE_GRID = (PAPER_DEACTIVATE, 0.0, None)  # tried in this order; None: no deactivation
DEFAULT_DEACTIVATE = "auto"
DEFAULT_STRENGTH = "auto"
STRENGTH_GRID = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0)  # lambda of mode add/diff, tried smallest first
DEFAULT_TARGET_FLIP = 0.8  # the calibration flip share a strength must reach
FLUENCY_FACTOR = 4.0  # steered median perplexity at most this x the plain continuations'
DEFAULT_CALIBRATION = 10  # calibration prompts (the CLI takes them before the reported ones)
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_PROMPT_WORDS = 4
REPETITION_PENALTY = 1.1


def default_signal(model_neurons, atlas, neuron_set=None) -> str:
    """The signal the set was selected on, else gate where the model and the atlas have it, else z."""
    recorded = getattr(neuron_set, "signal", None)
    if recorded:
        return recorded
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
    if not prompts and seen:
        raise NeuronAtlasError(f"corpus {corpus.path} has only {seen} documents of label {label!r}, all taken by the "
                               f"{skip} before the prompts (the calibration prompts); use fewer or a larger corpus")
    if not prompts:
        known = ", ".join(sorted(str(x) for x in labels if x is not None)) or "none"
        raise NeuronAtlasError(f"no documents of label {label!r} in corpus {corpus.path} (its labels: {known})")
    return prompts


def steering_interventions(neuron_set: NeuronSet, source: str, target: str, mode: str = "add",
                           deactivate_value: float | None = PAPER_DEACTIVATE, strength: float = 1.0,
                           signal: str = "gate") -> list[Intervention]:
    """The Language Arithmetics interventions: deactivate ``source``, then activate ``target``."""
    if mode not in MODES:
        raise NeuronAtlasError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")
    for label, role in ((source, "source"), (target, "target")):
        neuron_set.require_label(label, role)
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
    deactivate_value: float | str | None = DEFAULT_DEACTIVATE,
    strength: float | str = DEFAULT_STRENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    signal: str | None = None,
    *,
    calibration_prompts: Sequence[str] | None = None,
    target_flip: float = DEFAULT_TARGET_FLIP,
    grid: Sequence[float] = STRENGTH_GRID,
    langid=None,
    batch_size: int = 16,
    repetition_penalty: float = REPETITION_PENALTY,
    check_fingerprint: bool = True,
) -> dict:
    """Generate from ``prompts`` with and without steering ``source`` -> ``target``; judge the languages.

    ``strength`` and ``deactivate_value``: numbers (deactivation: or None), or ``"auto"``: searched on
    ``calibration_prompts`` (see :func:`search_steering`; keep them apart from ``prompts``). Returns a dict with ``flip_share``
    (share of steered continuations the language identifier puts in ``target``),
    ``baseline_target_share`` (the same without steering), the source shares, ``perplexity`` (median
    perplexity of the steered and plain continuations under the unsteered model), the per-prompt
    ``examples``, the ``strength_search`` (None when nothing was searched) and the parameters.
    """
    started = time.monotonic()
    check_causal(model.config, "steer", needs="text generation")
    neurons = locate_neurons(model)
    prompts = _prompt_list(prompts, "prompts")
    signal = signal or default_signal(neurons, atlas, neuron_set)
    if max_new_tokens < 1:
        raise NeuronAtlasError(f"max new tokens must be at least 1 (got {max_new_tokens})")
    for label, role in ((source, "source"), (target, "target")):
        if label not in atlas.labels:
            raise NeuronAtlasError(f"unknown {role} label {label!r}; the atlas has labels: {', '.join(atlas.labels)}")
    strengths = _strength_grid(strength, mode, grid)
    if isinstance(deactivate_value, str) and deactivate_value != "auto":
        raise NeuronAtlasError(f"the deactivation value must be a number, None or 'auto', not {deactivate_value!r}")
    deactivations = list(DEACTIVATE_GRID) if deactivate_value == "auto" else [deactivate_value]
    items = steering_interventions(neuron_set, source, target, mode, deactivations[0], strengths[0] or 1.0, signal)
    searching = len(strengths) > 1 or len(deactivations) > 1
    if searching:
        calibration_prompts = _prompt_list(calibration_prompts, "calibration prompts (needed by 'auto')")
    if check_fingerprint:
        _check_fingerprints(model, neurons, neuron_set, atlas)
    langid = langid or language_identifier()
    langid.check((source, target))
    with intervene(neurons, items, atlas=atlas, allow_empty=False):  # validated before the plain run
        pass
    run = Steering(model, tokenizer, neurons, atlas, neuron_set, source, target, mode, signal,
                   dict(max_new_tokens=max_new_tokens, batch_size=batch_size, repetition_penalty=repetition_penalty))
    search = None
    if searching:
        deactivate_value, strength, search = search_steering(run, calibration_prompts, langid, strengths,
                                                             deactivations, target_flip)
    else:
        deactivate_value, strength = deactivations[0], strengths[0]
    plain, steered = run.continuations(prompts), run.continuations(prompts, strength, deactivate_value)
    result = _judge(langid, source, target, prompts, plain, steered)
    result["perplexity"] = _fluency(run, result["examples"], search)
    result["strength_search"] = search
    result["params"] = {
        "mode": mode, "deactivate_value": deactivate_value, "strength": strength,
        "strength_chosen_by": "search on calibration prompts" if len(strengths) > 1 else "given",
        "deactivate_chosen_by": "search on calibration prompts" if len(deactivations) > 1 else "given", "signal": signal,
        "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty, "decoding": "greedy",
        "positions": "all", "language_identifier": langid.describe(),
        "neurons": {source: len(neuron_set.for_label(source)), target: len(neuron_set.for_label(target))},
    }
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def _strength_grid(strength, mode: str, grid: Sequence[float]) -> list[float | None]:
    """The strengths to try: the grid, smallest first, for "auto"; the one given; None for mode replace."""
    if mode == "replace":
        return [None]
    if strength != "auto":
        return [strength]
    if not grid or any(float(value) <= 0 for value in grid):
        raise NeuronAtlasError(f"the strength grid must be positive numbers, not {list(grid)}")
    return sorted(float(value) for value in grid)


def _prompt_list(prompts, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise NeuronAtlasError(f"no {what} to steer from; give at least one")
    return list(prompts)


@dataclass
class Steering:
    """Everything one steering run needs to generate with a given strength."""

    model: object
    tokenizer: object
    neurons: object
    atlas: object
    neuron_set: NeuronSet
    source: str
    target: str
    mode: str
    signal: str
    generation: dict

    def continuations(self, prompts: Sequence[str], strength: float | None | bool = False,
                      deactivate_value: float | None = PAPER_DEACTIVATE) -> list[str]:
        """Greedy continuations: plain (``strength`` False), else steered with ``strength`` (None for mode
        replace) and the source neurons set to ``deactivate_value`` (None: left alone)."""
        if strength is False:
            return generate(self.model, self.tokenizer, prompts, **self.generation)
        items = steering_interventions(self.neuron_set, self.source, self.target, self.mode, deactivate_value,
                                       1.0 if strength is None else strength, self.signal)
        with intervene(self.neurons, items, atlas=self.atlas, allow_empty=False):
            return generate(self.model, self.tokenizer, prompts, **self.generation)

    def perplexity(self, texts: Sequence[str]) -> list[float | None]:
        return perplexities(self.model, self.tokenizer, texts, self.generation["batch_size"])


def search_steering(run: Steering, prompts: Sequence[str], langid, strengths: Sequence[float | None] = STRENGTH_GRID,
                    deactivations: Sequence[float | None] = DEACTIVATE_GRID,
                    target_flip: float = DEFAULT_TARGET_FLIP) -> tuple[float | None, float | None, dict]:
    """The first (deactivation, strength) that flips ``target_flip`` of the calibration ``prompts`` fluently:
    deactivation values in the order given, and for each the strengths smallest first.

    Fluent: the median perplexity of the steered continuations (each alone, under the unsteered
    model) is at most ``FLUENCY_FACTOR`` x the plain continuations' median. The search stops at the
    first pair that qualifies; if none does, the fluent pair with the highest flip share is kept
    (the earliest on ties; else the first pair), with ``reached`` False. Returns the deactivation,
    the strength and the search's record.
    """
    if not 0 < target_flip <= 1:
        raise NeuronAtlasError(f"the target flip share must be in (0, 1], not {target_flip}")
    plain_ppl = _median(run.perplexity(run.continuations(prompts)))
    bound = None if plain_ppl is None else FLUENCY_FACTOR * plain_ppl
    trials = []
    for deactivate in deactivations:
        for strength in strengths:
            steered = run.continuations(prompts, strength, deactivate)
            flip = sum(lang == run.target for lang in _languages(langid, steered)) / len(prompts)
            ppl = _median(run.perplexity(steered))
            fluent = ppl is not None and (bound is None or ppl <= bound)
            trials.append({"deactivate": deactivate, "strength": strength, "flip_share": flip, "perplexity": ppl,
                           "fluent": fluent})
            if fluent and flip >= target_flip:
                break
        if trials[-1]["fluent"] and trials[-1]["flip_share"] >= target_flip:
            break
    fluent = [trial for trial in trials if trial["fluent"]]
    chosen = max(fluent, key=lambda t: t["flip_share"]) if fluent else trials[0]  # max keeps the earliest of ties
    return chosen["deactivate"], chosen["strength"], {
        "prompts": len(prompts), "grid": list(strengths), "deactivate_grid": list(deactivations),
        "target_flip": target_flip, "plain_perplexity": plain_ppl, "max_perplexity": bound,
        "fluency_factor": FLUENCY_FACTOR, "trials": trials, "chosen": chosen["strength"],
        "chosen_deactivate": chosen["deactivate"],
        "reached": chosen["fluent"] and chosen["flip_share"] >= target_flip, "calibration_flip_share": chosen["flip_share"],
    }


@torch.inference_mode()
def perplexities(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> list[float | None]:
    """The perplexity of each text alone under ``model`` (None for a text of fewer than two tokens)."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    out: list[float | None] = []
    for start in range(0, len(texts), batch_size):
        rows = [tokenizer(text)["input_ids"] for text in texts[start:start + batch_size]]
        width = max(max(len(row) for row in rows), 2)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
        logits = forward_batch(model, ids.to(device), mask.to(device)).logits[:, :-1].float()  # (B, T-1, V)
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(device), reduction="none")  # (B, T-1)
        real = (mask[:, 1:] * mask[:, :-1]).to(device)
        for loss, keep in zip(losses, real):
            count = int(keep.sum())
            out.append(math.exp(float((loss * keep).sum()) / count) if count else None)
    return out


def _median(values) -> float | None:
    kept = sorted(v for v in values if v is not None)
    return statistics.median(kept) if kept else None


def _fluency(run: Steering, examples: list[dict], search: dict | None) -> dict:
    """The median perplexity of the plain and steered continuations; each example gets its own."""
    for kind in ("plain", "steered"):
        for example, ppl in zip(examples, run.perplexity([e[kind] for e in examples])):
            example[f"{kind}_perplexity"] = ppl
    return {
        "plain": _median(e["plain_perplexity"] for e in examples),
        "steered": _median(e["steered_perplexity"] for e in examples),
        "max": search["max_perplexity"] if search else None,
        "measure": "median over continuations of exp(mean token NLL) of the continuation alone, under the unsteered model",
    }


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
    """A few examples, the strength search, the flip share and the fluency, as the CLI prints them."""
    src, tgt = result["source"], result["target"]
    p = result["params"]
    lines = [f"steering {src} -> {tgt} (mode {p['mode']}, strength {p['strength']} ({p['strength_chosen_by']}), "
             f"deactivate {p['deactivate_value']}, signal {p['signal']}, {p['max_new_tokens']} new tokens, "
             f"{result['prompts']} prompts; languages judged by {p['language_identifier']['name']})"]
    search = result.get("strength_search")
    if search:
        tried = ", ".join(f"{_pair(t['deactivate'], t['strength'])}: {t['flip_share']:.0%} ppl {_ppl(t['perplexity'])}"
                          for t in search["trials"])
        lines.append(f"search on {search['prompts']} calibration prompts, (deactivate, strength) (target flip "
                     f"{search['target_flip']:.0%}, perplexity <= {_ppl(search['max_perplexity'])}): {tried} -> "
                     f"{_pair(search['chosen_deactivate'], search['chosen'])}"
                     + ("" if search["reached"] else " (target not reached)"))
    for example in result["examples"][:examples]:
        lines.append(f"  prompt : {example['prompt']!r}")
        lines.append(f"  plain  : [{example['plain_lang']}] {example['plain']!r}")
        lines.append(f"  steered: [{example['steered_lang']}] {example['steered']!r}")
    fluency = result["perplexity"]
    lines.append(
        f"flip share: {result['flip_share']:.0%} of steered continuations in {tgt} "
        f"(without steering: {result['baseline_target_share']:.0%}); in {src}: "
        f"{result['source_share_steered']:.0%} steered vs {result['source_share_plain']:.0%} plain; "
        f"median perplexity {_ppl(fluency['steered'])} steered vs {_ppl(fluency['plain'])} plain"
    )
    lines.append("steered languages: " + ", ".join(f"{k} {v}" for k, v in result["steered_languages"].items()))
    return "\n".join(lines)


def _pair(deactivate: float | None, strength: float | None) -> str:
    def shown(value):
        return "none" if value is None else f"{value:g}"

    return f"({shown(deactivate)}, {shown(strength)})"


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


__all__ = ["steer", "steering_interventions", "prompts_from_corpus", "generate", "format_steering", "search_steering",
           "perplexities", "Steering", "STRENGTH_GRID",
           "DEACTIVATE_GRID"]
