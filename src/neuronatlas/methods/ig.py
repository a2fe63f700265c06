"""Knowledge neurons by integrated gradients (Dai et al. 2022).

Input: facts, each asked by several prompts ("paraphrases"), as records
``{"fact": id, "prompt": text, "answer": text}`` (``"id"`` is accepted for ``"fact"``).

1. For every prompt and every chosen layer l, the activations z_l at the prompt's last position
   are scaled from a zero baseline: z' = (k/m) z for k = 1..m (``steps`` m = 20), every other
   position and layer unchanged; IG_j = z_j * (1/m) sum_k dP(answer)/dz'_j at (k/m) z.
   P(answer) is the probability of the whole answer text after the prompt (teacher forced).
2. Per prompt, keep the neurons with IG >= ``threshold`` (0.2) x the largest IG over all the
   chosen layers (nothing when that largest IG is not positive).
3. Per fact, keep the neurons kept by at least ``share`` (0.7) of its prompts. With
   ``target_count=(2, 5)`` the share moves by 0.05 (up when too many, down when too few) until each
   fact has 2 to 5 neurons, as the paper tuned it per fact.

The neuron set has one label per fact; score = the neuron's mean IG over the fact's prompts.
Check (:func:`knowledge_check`): zero a fact's neurons, P(answer) drops for that fact far more
than for the other facts.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import NeuronAtlasError
from ..hooks import hook_sites
from ..models import check_causal, locate_neurons
from ..neuronset import Neuron, NeuronSet
from . import layer_of, model_block
from .gradients import answer_logprob, as_sequences, prompt_ids, read_jsonl

SHARE_STEP = 0.05


def read_facts(path) -> list[dict]:
    """Fact records from JSONL: {"fact" (or "id"), "prompt", "answer"}."""
    records = read_jsonl(path, ("prompt", "answer"), "fact")
    for number, record in enumerate(records, 1):
        fact = record.get("fact", record.get("id"))
        if fact is None:
            raise NeuronAtlasError(f"fact record {number} of {path} has no 'fact' (or 'id') field naming its fact")
        record["fact"] = str(fact)
    return records


def group_facts(records: list[dict], min_paraphrases: int) -> dict[str, list[dict]]:
    """{fact: its records}; every fact needs ``min_paraphrases`` prompts."""
    if not records:
        raise NeuronAtlasError("no facts given; pass records {fact, prompt, answer}")
    facts: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        facts[str(record["fact"])].append(record)
    few = {fact: len(rows) for fact, rows in facts.items() if len(rows) < min_paraphrases}
    if few:
        shown = ", ".join(f"{fact!r} ({count})" for fact, count in sorted(few.items())[:5])
        raise NeuronAtlasError(f"fact(s) {shown} have fewer than {min_paraphrases} prompts; give each fact at least "
                               f"{min_paraphrases} paraphrases (or lower min_paraphrases / --min-paraphrases)")
    return dict(facts)


def _encode(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    where = f"fact {record['fact']!r}"
    prompt = prompt_ids(tokenizer, record["prompt"], where)
    answer = list(tokenizer(record["answer"], add_special_tokens=False)["input_ids"])
    if not answer:
        raise NeuronAtlasError(f"{where}: the answer {record['answer']!r} gives no tokens; give a non-empty answer")
    return prompt, answer


def integrated_gradients(model, prompt: list[int], answer: list[int], layer: int, steps: int = 20) -> torch.Tensor:
    """IG of P(answer) for every neuron of ``layer`` at the prompt's last position, (d_ff,) float64."""
    neurons = locate_neurons(model)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer[:-1]], device=device).expand(steps, -1)  # (m, T)
    position = len(prompt) - 1
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps  # (m,)
    state: dict = {}

    def scale(index: int, flat: torch.Tensor) -> torch.Tensor:
        z = as_sequences(flat, ids.shape[1])  # (m, T, d_ff)
        original = z[0, position].detach()  # (d_ff,)
        scaled = (alphas[:, None].to(z.dtype) * original).requires_grad_(True)  # (m, d_ff)
        state["original"], state["scaled"] = original, scaled
        z = z.clone()
        z[:, position] = scaled
        return z.reshape(flat.shape)

    with hook_sites(neurons, before_down=scale, layers=[layer]), torch.enable_grad():
        logits = model(input_ids=ids, use_cache=False).logits  # (m, T, V)
        probability = answer_logprob(logits, answer).exp()  # (m,)
        (grad,) = torch.autograd.grad(probability.sum(), state["scaled"])  # (m, d_ff)
    return (state["original"].double() * grad.double().mean(0)).cpu()


def prompt_attributions(model, prompt: list[int], answer: list[int], layers: list[int], steps: int) -> torch.Tensor:
    """(N,) IG of every neuron (layers concatenated; zeros outside ``layers``) for one prompt."""
    widths = locate_neurons(model).widths
    out = torch.zeros(sum(widths), dtype=torch.float64)
    offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
    for layer in layers:
        out[offsets[layer] : offsets[layer + 1]] = integrated_gradients(model, prompt, answer, layer, steps)
    return out


def _kept_per_prompt(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """(P, N) bool: IG >= threshold x the prompt's largest IG (rows with no positive IG keep nothing)."""
    peak = scores.amax(1, keepdim=True)  # (P, 1)
    return (scores >= threshold * peak) & (peak > 0)


def _select_fact(kept: torch.Tensor, share: float, target_count) -> tuple[torch.Tensor, float]:
    """Neurons kept by >= share of the prompts; the share moved by 0.05 toward ``target_count``."""
    frequency = kept.double().mean(0)  # (N,)
    chosen = frequency >= share - 1e-9
    if target_count is None:
        return chosen, share
    low, high = target_count
    for _ in range(int(1 / SHARE_STEP)):
        count = int(chosen.sum())
        if count > high and share + SHARE_STEP <= 1 + 1e-9:
            share += SHARE_STEP
        elif count < low and share - SHARE_STEP > 1e-9:
            share -= SHARE_STEP
        else:
            break
        chosen = frequency >= share - 1e-9
    return chosen, round(share, 4)


def _check_options(steps, threshold, share, min_paraphrases, target_count, layers, num_layers) -> list[int]:
    if steps < 1:
        raise NeuronAtlasError(f"steps must be at least 1 (got {steps}); the paper uses 20")
    if not 0 < threshold <= 1:
        raise NeuronAtlasError(f"threshold must be in (0, 1] (got {threshold}); 0.2 keeps IG >= 0.2 x the maximum")
    if not 0 < share <= 1:
        raise NeuronAtlasError(f"share must be in (0, 1] (got {share}); 0.7 keeps neurons shared by 70% of the prompts")
    if min_paraphrases < 1:
        raise NeuronAtlasError(f"min paraphrases must be at least 1 (got {min_paraphrases})")
    if target_count is not None and not 0 <= target_count[0] <= target_count[1]:
        raise NeuronAtlasError(f"target count must be (low, high) with 0 <= low <= high (got {target_count})")
    chosen = list(range(num_layers)) if layers is None else sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 0 <= layer < num_layers]
    if bad or not chosen:
        raise NeuronAtlasError(f"layer(s) {bad or chosen} out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    return chosen


def find_knowledge_neurons(model, tokenizer, facts: list[dict], steps: int = 20, threshold: float = 0.2,
                           share: float = 0.7, layers: list[int] | None = None, min_paraphrases: int = 2,
                           target_count: tuple[int, int] | None = None, quiet: bool = True) -> NeuronSet:
    """Knowledge neurons per fact by integrated gradients; see the module docstring.

    >>> found = find_knowledge_neurons(model, tokenizer, read_facts("facts.jsonl"), layers=[2])  # doctest: +SKIP
    """
    check_causal(model.config, "find ig", needs="the probability of the answer after each prompt")
    neurons = locate_neurons(model)
    chosen_layers = _check_options(steps, threshold, share, min_paraphrases, target_count, layers, neurons.num_layers)
    grouped = group_facts(facts, min_paraphrases)
    locate = layer_of(neurons.widths)
    found, per_fact = [], {}
    progress = _progress(sum(len(rows) for rows in grouped.values()), quiet)
    for fact, rows in sorted(grouped.items()):
        scores = []
        for record in rows:
            prompt, answer = _encode(tokenizer, record)
            scores.append(prompt_attributions(model, prompt, answer, chosen_layers, steps))
            if progress is not None:
                progress.update(1)
        scores = torch.stack(scores)  # (P, N)
        kept, used_share = _select_fact(_kept_per_prompt(scores, threshold), share, target_count)
        flat = kept.nonzero().flatten()
        mean = scores.mean(0)
        layer_ids, indices = locate(flat)
        for layer, index, position in zip(layer_ids.tolist(), indices.tolist(), flat.tolist()):
            found.append(Neuron(layer, index, float(mean[position]), fact))
        per_fact[fact] = {"prompts": len(rows), "neurons": int(flat.numel()), "share": used_share}
    if progress is not None:
        progress.close()
    params = {"steps": steps, "threshold": threshold, "share": share, "layers": chosen_layers,
              "target_count": list(target_count) if target_count else None, "min_paraphrases": min_paraphrases,
              "baseline": "zero", "position": "last prompt token", "per_fact": per_fact,
              "score": "mean integrated gradient of P(answer) over the fact's prompts"}
    return NeuronSet("ig", model_block(model), found, params)


def _progress(total: int, quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="prompt", desc="integrated gradients", dynamic_ncols=True)


@torch.inference_mode()
def answer_probabilities(model, tokenizer, facts: list[dict]) -> torch.Tensor:
    """(P,) P(answer | prompt) of every record, one forward each."""
    device = next(model.parameters()).device
    out = []
    for record in facts:
        prompt, answer = _encode(tokenizer, {"fact": record.get("fact", "?"), **record})
        logits = model(input_ids=torch.tensor([prompt + answer[:-1]], device=device), use_cache=False).logits
        out.append(float(answer_logprob(logits, answer).exp()))
    return torch.tensor(out, dtype=torch.float64)


def knowledge_check(model, tokenizer, facts: list[dict], found: NeuronSet) -> dict:
    """Zero each fact's neurons: mean relative drop of P(answer) on its own prompts and on the others'.

    Returns {"own": mean drop, "others": mean drop, "ratio": own / others (None unless others > 0),
    "per_fact": {...}}; a drop of 0.4 means P(answer) fell to 60% of its value. Facts without neurons
    are skipped.
    """
    from ..intervene import Intervention, intervene

    base = answer_probabilities(model, tokenizer, facts)
    names = [str(record["fact"]) for record in facts]
    per_fact, own, others = {}, [], []
    for fact in found.labels:
        with intervene(model, [Intervention(found.for_label(fact), "zero")]):
            ablated = answer_probabilities(model, tokenizer, facts)
        drop = 1 - ablated / base  # (P,)
        mine = torch.tensor([name == fact for name in names])
        per_fact[fact] = {"own": float(drop[mine].mean()), "others": float(drop[~mine].mean())}
        own.append(per_fact[fact]["own"])
        others.append(per_fact[fact]["others"])
    if not own:
        raise NeuronAtlasError("the knowledge neuron set is empty: no fact has neurons to zero")
    mean_own, mean_others = sum(own) / len(own), sum(others) / len(others)
    ratio = mean_own / mean_others if mean_others > 0 else None
    return {"own": mean_own, "others": mean_others, "ratio": ratio, "per_fact": per_fact}
