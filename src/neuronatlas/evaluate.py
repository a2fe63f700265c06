"""The causal check of a labelled neuron set: ablate each label's neurons, measure every label's loss.

For every label L of the neuron set, L's neurons are ablated in all layers at once (``op="zero"``
by default) and the mean next-token NLL is measured on held-out text of every label of the
corpus. The increase over the unablated model gives a matrix ``delta[L][M]`` (rows: the ablated
set, columns: the text). Controls: for every L, ``controls`` random neuron sets with the same
number of neurons per layer as L's set (drawn among the layer's other neurons, seeded), measured
on L's own text; their mean increase and a 95% Student-t interval
``mean ± t(0.975, n-1) · sd / sqrt(n)``.

A label's set is **specific** when its own increase exceeds every other label's increase in its
row (the neurons matter more for their language than for the others) and the upper end of the
control interval (more than random neurons of the same per-layer sizes).

    >>> result = evaluate(model, tokenizer, neuron_set, "heldout.jsonl", label_field="lang")  # doctest: +SKIP
    >>> print(to_markdown(result)); plot_heatmap(result, "eval.png")                       # doctest: +SKIP

Batches are built once (per label, sorted by length, right padded) and reused for every
condition; only real tokens are counted. The conditions (clean model, ablations, controls) share
forwards: a batch is repeated once per condition, each copy under its own ablation, so the clean
pass and several ablations cost one forward (same numbers as one condition at a time, to float
rounding). The set's ablation is on the signal it was selected on (``neuron_set.signal``) unless
``signal`` says otherwise.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .corpus import Batch, Corpus, iter_batches, iter_windows, read_corpus
from .errors import NeuronAtlasError
from .hooks import forward_batch, hook_sites, pad_token_id
from .intervene import SIGNALS, Intervention, check_interventions, combine
from .loading import model_fingerprint, window_length
from .models import check_causal, locate_neurons
from .neuronset import NeuronSet

FORMAT_VERSION = 1
EVAL_OPS = ("zero", "mean", "constant", "scale")
DEFAULT_MAX_LENGTH = 256
AUTO_TOKENS_PER_FORWARD = 8192  # conditions stacked per forward: up to this many tokens (logits: tokens x vocab)
INTERVAL = "t95: mean ± t(0.975, n-1)·sd/sqrt(n) over the control sets"

# Student t quantiles t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher expansion.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def evaluate(
    model,
    tokenizer,
    neuron_set: NeuronSet,
    corpus: str | Path | Corpus,
    controls: int = 5,
    op: str = "zero",
    max_docs_per_label: int | None = None,
    seed: int = 0,
    *,
    atlas=None,
    value: float | None = None,
    signal: str | None = None,
    text_field: str = "text",
    label_field: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    conditions_per_forward: int | None = None,
    check_fingerprint: bool = True,
    quiet: bool = True,
) -> dict:
    """Ablate each label's neurons and measure the mean token NLL on every label's text.

    ``corpus``: a :class:`~neuronatlas.corpus.Corpus` with labels, or a path read with
    ``text_field`` / ``label_field``. ``op``: ``zero`` (default), ``mean`` (needs ``atlas``),
    ``constant`` or ``scale`` (need ``value``). ``signal``: ``z`` or ``gate``; default: the signal the
    set was selected on (``neuron_set.signal``), else ``z``. ``conditions_per_forward``: how many
    conditions share one forward (the batch repeated per condition); default: as many as keep a
    forward under 8,192 tokens. Returns the EVAL.json dict (see the module docstring).
    """
    started = time.monotonic()
    check_causal(model.config, "evaluate", needs="next-token NLL")
    neurons = locate_neurons(model)
    signal = signal or getattr(neuron_set, "signal", None) or "z"
    _check_arguments(neuron_set, controls, op, value, atlas, signal, neurons, batch_size, max_docs_per_label,
                     conditions_per_forward)
    fingerprint = model_fingerprint(model)
    if check_fingerprint:
        neuron_set.check_model(fingerprint, neurons.widths)
    corpus = _labelled_corpus(corpus, text_field, label_field)
    max_length = window_length(model.config, max_length, DEFAULT_MAX_LENGTH)
    batches, documents, tokens = _label_batches(corpus, tokenizer, max_docs_per_label, max_length, batch_size)
    labels, set_labels = sorted(batches), neuron_set.labels
    sets = _label_sets(neuron_set, labels, corpus)
    ablation = partial(Intervention, op=op, value=value, signal=signal)
    baseline, nll, control = _measure(model, neurons, batches, sets, ablation, atlas, controls, seed,
                                      conditions_per_forward, quiet)
    delta = {row: {col: nll[row][col] - baseline[col] for col in labels} for row in set_labels}
    return {
        "format_version": FORMAT_VERSION,
        "kind": "evaluation",
        "model": {
            "name_or_path": str(getattr(model, "name_or_path", "") or model.config._name_or_path),
            "model_type": neurons.model_type,
            "fingerprint": fingerprint,
        },
        "neuron_set": {"method": neuron_set.method, "params": neuron_set.params,
                       "neurons": {label: sum(len(i) for i in sets[label].values()) for label in set_labels},
                       "neurons_per_layer": {label: {str(l): len(i) for l, i in sets[label].items()} for label in set_labels}},
        "corpus": str(corpus.path),
        "labels": labels,
        "set_labels": set_labels,
        "documents": documents,
        "tokens": tokens,
        "baseline": baseline,
        "nll": nll,
        "delta": delta,
        "control": control,
        **_verdicts(delta, control, set_labels, labels),
        "params": {
            "op": op, "value": value, "signal": signal, "controls": controls, "seed": seed,
            "max_docs_per_label": max_docs_per_label, "batch_size": batch_size, "max_length": max_length,
            "conditions_per_forward": conditions_per_forward or "auto",
            "interval": INTERVAL if controls else None,
            "control_sets": "same neurons per layer as the label's set, drawn uniformly among the layer's other neurons",
        },
        "seconds": round(time.monotonic() - started, 2),
    }


def _measure(model, neurons, batches, sets, ablation, atlas, controls: int, seed: int, per_forward, quiet: bool):
    """(baseline NLL per text label, NLL per ablated label and text label, control summary per ablated label).

    Every condition (the clean model, each label's ablation, each control) is compiled first; then
    each batch of text runs once for a group of conditions: the batch is repeated once per condition
    in one forward, block m of the rows under condition m's ablation (exact: rows do not interact).
    """
    labels = sorted(batches)
    generator = torch.Generator().manual_seed(seed)
    conditions = [("baseline", None, labels)] + [(label, table, labels) for label, table in sets.items()]
    for label, table in sets.items():  # drawn in this order: the same sets as one condition at a time
        conditions += [(label, random_like(table, neurons.widths, generator), [label]) for _ in range(controls)]
    plans = [{} if table is None else check_interventions(neurons, [ablation(table)], atlas, allow_empty=False)
             for _, table, _ in conditions]
    totals = [dict.fromkeys(texts, 0.0) for _, _, texts in conditions]
    device = next(model.parameters()).device
    progress = _Progress(sum(len(batches[label]) * sum(label in c[2] for c in conditions) for label in labels), quiet)
    for label in labels:
        chosen = [i for i, (_, _, texts) in enumerate(conditions) if label in texts]
        for batch in batches[label]:
            group = per_forward or max(1, AUTO_TOKENS_PER_FORWARD // batch.input_ids.numel())
            for start in range(0, len(chosen), group):
                block = chosen[start:start + group]
                sums = _block_nll(model, neurons, batch, [plans[i] for i in block], device)
                for i, total in zip(block, sums):
                    totals[i][label] += total
                progress.step(label, len(block))
    progress.close()
    count = {label: sum(int((b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).sum()) for b in batches[label])
             for label in labels}
    mean = [{label: total / max(count[label], 1) for label, total in row.items()} for row in totals]
    baseline = mean[0]
    nll = {label: mean[1 + k] for k, label in enumerate(sets)}
    control = {}
    for k, label in enumerate(sets):
        first = 1 + len(sets) + k * controls
        if controls:
            control[label] = summarize([row[label] - baseline[label] for row in mean[first:first + controls]])
    return baseline, nll, control


@torch.inference_mode()
def _block_nll(model, neurons, batch: Batch, plans: list[dict], device) -> list[float]:
    """Summed next-token NLL (nats) of ``batch``'s real tokens under each plan, in one forward.

    The (B, T) batch is repeated len(plans) times: rows [m*B, (m+1)*B) run under plans[m]."""
    copies = len(plans)
    ids = batch.input_ids.to(device).repeat(copies, 1)  # (copies*B, T)
    mask = batch.attention_mask.to(device).repeat(copies, 1)
    hooks = {signal: sorted({layer for plan in plans for layer, kind in plan if kind == signal}) for signal in SIGNALS}
    with ExitStack() as stack:
        if hooks["z"]:
            stack.enter_context(hook_sites(neurons, before_down=_row_blocks(plans, "z"), layers=hooks["z"]))
        if hooks["gate"]:
            stack.enter_context(hook_sites(neurons, after_act=_row_blocks(plans, "gate"), layers=hooks["gate"]))
        logits = forward_batch(model, ids, mask).logits  # (copies*B, T, V)
    rows = batch.input_ids.shape[0]
    real = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool().to(device)  # (B, T-1)
    targets = ids[:rows, 1:]
    sums = []
    for m in range(copies):  # one block at a time: a float copy of all logits could be large
        block = logits[m * rows:(m + 1) * rows, :-1].float()
        losses = F.cross_entropy(block.reshape(-1, block.shape[-1]), targets.reshape(-1), reduction="none")
        sums.append(float(losses[real.reshape(-1)].double().sum()))
    return sums


def _row_blocks(plans: list[dict], signal: str):
    """A site function applying plans[m]'s edits of ``signal`` to the m-th of len(plans) equal row blocks.

    Works on (N, T, D) and on flattened (N*T, D) activations alike: the blocks are contiguous in both."""
    def edit(layer: int, x: torch.Tensor):
        size = x.shape[0] // len(plans)
        out = None
        for m, plan in enumerate(plans):
            for step in plan.get((layer, signal), ()):
                out = x.clone() if out is None else out
                index, vector = step.on(x.device, x.dtype)
                rows = out[m * size:(m + 1) * size]  # a view: writing it writes out
                rows[..., index] = combine(step.kind, rows[..., index], vector)
        return out

    return edit


def _verdicts(delta: dict, control: dict, set_labels: list[str], labels: list[str]) -> dict:
    """Which sets are specific, and the mean diagonal / off-diagonal increases and their ratio."""
    specific = {}
    for label in set_labels:
        own = delta[label][label]
        others = [delta[label][col] for col in labels if col != label]
        beats_controls = (own > control[label]["high"]) if label in control else True
        specific[label] = bool(all(own > other for other in others) and beats_controls)
    diagonal = [delta[label][label] for label in set_labels]
    off = [delta[row][col] for row in set_labels for col in labels if col != row]
    mean_diagonal = sum(diagonal) / len(diagonal)
    mean_off = sum(off) / len(off) if off else float("nan")
    ratio = mean_diagonal / mean_off if off and mean_off > 0 else None
    return {"specific": specific, "mean_diagonal": mean_diagonal, "mean_off_diagonal": mean_off, "ratio": ratio}


# ---- pieces -----------------------------------------------------------------------------------


def _labelled_corpus(corpus, text_field: str, label_field: str | None) -> Corpus:
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus, text_field=text_field, label_field=label_field)
    if corpus.label_field is None and not corpus.label_from_folder:
        raise NeuronAtlasError(
            f"evaluate needs labelled documents to measure each label's text, but corpus {corpus.path} is read "
            "without labels; pass label_field / --label-field (e.g. lang)"
        )
    return corpus


def _label_sets(neuron_set: NeuronSet, labels: list[str], corpus: Corpus) -> dict[str, dict[int, torch.Tensor]]:
    """{set label: {layer: neuron indices}}; every set label needs text and neurons."""
    missing = [label for label in neuron_set.labels if label not in labels]
    if missing:
        raise NeuronAtlasError(
            f"neuron set label(s) {', '.join(map(repr, missing))} have no text in corpus {corpus.path} "
            f"(it has: {', '.join(labels)}); evaluate on a corpus with those labels"
        )
    sets = {label: neuron_set.for_label(label).per_layer() for label in neuron_set.labels}
    empty = [label for label, table in sets.items() if not table]
    if empty:
        raise NeuronAtlasError(f"the neuron set has no neurons for label(s) {', '.join(empty)}")
    return sets


def _check_arguments(neuron_set, controls, op, value, atlas, signal, neurons, batch_size, max_docs, per_forward) -> None:
    if not isinstance(neuron_set, NeuronSet):
        raise NeuronAtlasError(f"evaluate needs a NeuronSet, not {type(neuron_set).__name__}")
    if not len(neuron_set):
        raise NeuronAtlasError("the neuron set is empty: there is nothing to ablate (find neurons first)")
    if not neuron_set.labels:
        raise NeuronAtlasError(
            f"the neuron set ({neuron_set.method}) has no labels; evaluate compares each label's neurons on each "
            "label's text, so use a set whose neurons carry labels (e.g. from find_lape)"
        )
    if op not in EVAL_OPS:
        raise NeuronAtlasError(f"unknown ablation op {op!r} for evaluate; use one of {', '.join(EVAL_OPS)}")
    if op in ("constant", "scale") and value is None:
        raise NeuronAtlasError(f"op {op!r} needs a value (e.g. value=0.5 / --value 0.5)")
    if op == "mean" and atlas is None:
        raise NeuronAtlasError("op 'mean' replaces activations by their atlas mean: pass the atlas (--atlas)")
    if signal == "gate" and not neurons.gated:
        raise NeuronAtlasError(f"signal 'gate' needs a gated MLP, but {neurons.model_type} has none; use signal 'z'")
    if controls < 0 or controls == 1:
        raise NeuronAtlasError(f"controls must be 0 (none) or at least 2 for an interval, not {controls}")
    if batch_size < 1:
        raise NeuronAtlasError(f"batch size must be at least 1, not {batch_size}")
    if per_forward is not None and per_forward < 1:
        raise NeuronAtlasError(f"conditions per forward must be at least 1, not {per_forward}")
    if max_docs is not None and max_docs < 1:
        raise NeuronAtlasError(f"max docs per label must be at least 1, not {max_docs}")


def _label_batches(corpus: Corpus, tokenizer, max_docs: int | None, max_length: int, batch_size: int):
    """{label: [Batch]} of windows with at least two tokens; documents and predicted tokens per label."""
    chosen, taken = [], defaultdict(int)
    for doc in corpus:
        if doc.label is None:
            continue
        if max_docs is None or taken[doc.label] < max_docs:
            chosen.append(doc)
            taken[doc.label] += 1
    if not chosen:
        raise NeuronAtlasError(f"corpus {corpus.path} has no labelled documents to evaluate on")
    per_label = defaultdict(list)
    for window in iter_windows(chosen, tokenizer, max_length):
        if len(window.input_ids) >= 2:
            per_label[window.label].append(window)
    pad = pad_token_id(tokenizer)
    batches = {}
    tokens = {}
    for label, windows in sorted(per_label.items()):
        windows.sort(key=lambda w: (-len(w.input_ids), w.seq))  # less padding, deterministic
        batches[label] = list(iter_batches(windows, batch_size, pad, "right"))
        tokens[label] = sum(len(w.input_ids) - 1 for w in windows)
    documents = {label: taken[label] for label in sorted(per_label)}
    return batches, documents, tokens


def random_like(table: dict[int, torch.Tensor], widths: list[int], generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Random neurons with the same count per layer as ``table``, avoiding its own neurons when possible."""
    out = {}
    for layer, chosen in table.items():
        n, width = len(chosen), widths[layer]
        pool = torch.ones(width, dtype=torch.bool)
        pool[chosen] = False
        candidates = pool.nonzero().squeeze(1) if int(pool.sum()) >= n else torch.arange(width)
        pick = torch.randperm(len(candidates), generator=generator)[:n]
        out[layer] = candidates[pick].sort().values
    return out


def summarize(values: list[float]) -> dict:
    """Mean, sd and the Student-t 95% interval of ``values`` (n >= 2)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n, "values": values}


class _Progress:
    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="batch", desc="evaluate", dynamic_ncols=True)

    def step(self, what: str, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- reports ----------------------------------------------------------------------------------


def format_matrix(result: dict) -> str:
    """The delta matrix as plain text, with controls and verdicts (what the CLI prints)."""
    labels, rows = result["labels"], result["set_labels"]
    width = max(7, *(len(label) for label in labels))
    params = result["params"]
    lines = [f"increase in mean token NLL (nats) when the row's neurons are ablated (op {params['op']}, "
             f"signal {params['signal']}), on the column's text"]
    header = f"{'set':<{width}} " + " ".join(f"{label:>{width}}" for label in labels)
    header += f" {'control (95% CI)':>26} {'verdict':>12}"
    lines.append(header)
    for row in rows:
        cells = []
        for col in labels:
            value = f"{result['delta'][row][col]:+.4f}"
            cells.append(f"{'*' + value if col == row else value:>{width}}")
        control = result["control"].get(row)
        ctrl = f"{control['mean']:+.4f} [{control['low']:+.4f}, {control['high']:+.4f}]" if control else "-"
        verdict = "specific" if result["specific"][row] else "NOT specific"
        lines.append(f"{row:<{width}} " + " ".join(cells) + f" {ctrl:>26} {verdict:>12}")
    lines.append("baseline NLL: " + ", ".join(f"{k} {v:.4f}" for k, v in result["baseline"].items()))
    ratio = result["ratio"]
    lines.append(
        f"mean diagonal {result['mean_diagonal']:+.4f}, mean off-diagonal {result['mean_off_diagonal']:+.4f}, "
        f"ratio {'n/a' if ratio is None else f'{ratio:.2f}'}; "
        f"specific: {sum(result['specific'].values())}/{len(result['specific'])}"
    )
    return "\n".join(lines)


def to_markdown(result: dict) -> str:
    """A markdown table: one row per ablated set, one column per text label, controls, verdict."""
    labels, rows = result["labels"], result["set_labels"]
    params = result["params"]
    out = [
        f"**Ablation ({params['op']}, signal {params['signal']})**: increase in mean token NLL (nats) over the "
        f"unablated model; rows = ablated label's neurons, columns = text label; diagonal in bold. "
        f"Control = {params['controls']} random sets of the same per-layer sizes, on the row label's text "
        f"({'95% Student-t interval' if params['controls'] else 'none'}).",
        "",
        "| set \\ text | " + " | ".join(labels) + " | neurons | control mean [95% CI] | specific |",
        "|---|" + "---:|" * len(labels) + "---:|---:|:---:|",
    ]
    for row in rows:
        cells = []
        for col in labels:
            value = f"{result['delta'][row][col]:+.4f}"
            cells.append(f"**{value}**" if col == row else value)
        control = result["control"].get(row)
        ctrl = f"{control['mean']:+.4f} [{control['low']:+.4f}, {control['high']:+.4f}]" if control else "-"
        verdict = "yes" if result["specific"][row] else "no"
        out.append(f"| {row} | " + " | ".join(cells) + f" | {result['neuron_set']['neurons'][row]} | {ctrl} | {verdict} |")
    out.append("| baseline NLL | " + " | ".join(f"{result['baseline'][col]:.4f}" for col in labels) + " | | | |")
    ratio = result["ratio"]
    out += ["", f"Mean diagonal {result['mean_diagonal']:+.4f}, mean off-diagonal {result['mean_off_diagonal']:+.4f}, "
                f"ratio {'n/a' if ratio is None else f'{ratio:.2f}'}."]
    return "\n".join(out) + "\n"


def plot_heatmap(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Save the delta matrix as a heatmap PNG (matplotlib's Agg canvas; pyplot is not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, rows = result["labels"], result["set_labels"]
    matrix = [[result["delta"][row][col] for col in labels] for row in rows]
    fig = Figure(figsize=(1.2 + 0.9 * len(labels), 1.0 + 0.8 * len(rows)), dpi=120)
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display needed
    ax = fig.subplots()
    peak = max((abs(v) for line in matrix for v in line), default=1.0) or 1.0
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-peak, vmax=peak)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("text")
    ax.set_ylabel("ablated neurons")
    fmt = ".3f" if peak >= 0.01 else ".1e"
    for i, line in enumerate(matrix):
        for j, v in enumerate(line):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > 0.6 * peak else "black")
    fig.colorbar(image, ax=ax, label="Δ NLL (nats)")
    ax.set_title(title or f"ablation ({result['params']['op']}) Δ NLL", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


__all__ = ["evaluate", "to_markdown", "plot_heatmap", "format_matrix", "random_like", "summarize", "t975"]
