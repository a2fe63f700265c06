"""Perplexity against sparsity for every sparse method and its random control, plus greedy agreement.

    python benchmarks/sparse_quality.py [--model tiny-llama | PATH.gguf | DIR] [--sparsities 0.25,0.4,0.5,0.65]
        [--configs teal-uniform-mlp,teal-greedy-all,...] [--windows 32] [--agreement-prompts 8] [--languages en]

Calibration on the bundled training corpus (every n-th of ``--train-docs`` documents, all
languages alike): an atlas (hot), a calibration pass (TEAL, WINA, CATS: ``--calib-windows`` windows of
``--max-length`` tokens; greedy allocation on the first ``--greedy-tokens`` of them), nothing
(CoreInfer; MoE with 16 experts split by k-means of W_in rows, centroid router). Each plan is
calibrated once and re-targeted to every sparsity. Held-out perplexity as in ``neuronatlas bench``
(each bundled held-out window's second half after prefilling its first half), and a downstream
check that is not perplexity: greedy-continuation agreement, the share of ``--agreement-tokens``
greedy tokens equal to the dense model's over ``--agreement-prompts`` held-out prompts (teacher
forced on the dense continuation, so one early difference does not count for every later token).
Prints one JSON line per configuration and sparsity, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from neuronatlas import bundled
from neuronatlas.loading import load_model
from neuronatlas.sparse import SparsifyOptions, sparsify
from neuronatlas.sparse.bench import eval_windows, perplexity
from neuronatlas.sparse.wrap import SparseModel

CONFIGS = ("teal-uniform-mlp", "teal-greedy-mlp", "teal-uniform-all", "teal-greedy-all", "wina-greedy-all",
           "cats", "hot", "coreinfer", "moe")


def in_languages(source: Path, languages: str | None) -> list[str]:
    """The corpus's jsonl lines, only those whose "lang" is one of ``languages`` (comma-separated) if given."""
    lines = source.read_text(encoding="utf-8").splitlines()
    wanted = set(languages.split(",")) if languages else None
    return [line for line in lines if wanted is None or json.loads(line)["lang"] in wanted]


def training_slice(path: Path, documents: int, languages: str | None = None) -> Path:
    """Every n-th training document, ``documents`` of them, all languages alike (or only ``languages``)."""
    lines = in_languages(bundled.CORPUS_TRAIN, languages)
    path.write_text("\n".join(lines[:: max(1, len(lines) // documents)][:documents]) + "\n", encoding="utf-8")
    return path


@torch.inference_mode()
def agreement(model, prompts: list[torch.Tensor], tokens: int, sparse: SparseModel | None = None,
              reference: list[torch.Tensor] | None = None) -> tuple[float, list[torch.Tensor]]:
    """(share of greedy next tokens equal to ``reference``'s, this model's greedy continuations).

    Without a reference the model's own greedy continuation is returned (the dense reference);
    with one, the sparse model predicts each next token given the dense continuation so far.
    """
    same, total, outputs = 0, 0, []
    for index, prompt in enumerate(prompts):
        if reference is None:
            out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            outputs.append(out[:, prompt.shape[1]:])
            continue
        full = torch.cat([prompt, reference[index]], 1)
        with sparse:
            first = model(input_ids=full[:, : prompt.shape[1]], use_cache=True)
            with sparse.continuation():
                rest = model(input_ids=full[:, prompt.shape[1] : -1], past_key_values=first.past_key_values).logits
        predicted = torch.cat([first.logits[:, -1:], rest], 1).argmax(-1)  # (1, tokens)
        same += int((predicted == reference[index]).sum())
        total += reference[index].numel()
    return (same / max(total, 1)), outputs


def make_plan(config: str, model, tokenizer, train: Path, atlas, args):
    method, _, variant = config.partition("-")
    allocation, _, scope = variant.partition("-")
    options = SparsifyOptions(calib_tokens=args.calib_windows * args.max_length, max_length=args.max_length,
                              scope=scope or "mlp", allocation=allocation or "uniform",
                              greedy_tokens=args.greedy_tokens, greedy_step=args.greedy_step, greedy_top=args.greedy_top,
                              greedy_units=args.greedy_units, greedy_search=args.greedy_search,
                              greedy_error=args.greedy_error, greedy_last=args.greedy_last,
                              prefill=args.prefill)
    return sparsify(method, model, tokenizer, 0.5, atlas=atlas if method == "hot" else None,
                    corpus=train if method in ("teal", "wina", "cats") else None, options=options)


def measure(config, model, plan, windows, sparsities, dense, prompts, reference, args) -> list[dict]:
    points = []
    for sparsity in sparsities:
        target = plan.at_sparsity(sparsity)
        torch.manual_seed(0)  # TEAL/WINA/MoE controls draw per token
        point = {"config": config, "sparsity": sparsity, "ppl_dense": dense,
                 "ppl_sparse": perplexity(model, windows, SparseModel(model, target)),
                 "ppl_random": perplexity(model, windows, SparseModel(model, target.as_control("random")))}
        if prompts:
            point["agreement"] = agreement(model, prompts, args.agreement_tokens, SparseModel(model, target), reference)[0]
            point["agreement_random"] = agreement(model, prompts, args.agreement_tokens,
                                                  SparseModel(model, target.as_control("random")), reference)[0]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()}), flush=True)
        points.append(point)
    return points


def table(points: list[dict], sparsities: list[float]) -> str:
    head = "| configuration | " + " | ".join(f"{s:.0%}: ppl method / random" for s in sparsities) + " |"
    lines = [head, "|---|" + "---|" * len(sparsities)]
    for config in dict.fromkeys(p["config"] for p in points):
        row = {p["sparsity"]: p for p in points if p["config"] == config}
        cells = []
        for s in sparsities:
            point = row[s]
            cell = f"×{point['ppl_sparse'] / point['ppl_dense']:.2f} / ×{point['ppl_random'] / point['ppl_dense']:.2f}"
            if "agreement" in point:
                cell += f" (agree {point['agreement']:.0%} / {point['agreement_random']:.0%})"
            cells.append(cell)
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a bundled model name, a model folder or a .gguf file")
    parser.add_argument("--sparsities", default="0.25,0.4,0.5,0.65")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {', '.join(CONFIGS)}")
    parser.add_argument("--train-docs", type=int, default=80)
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows (TEAL, WINA, CATS)")
    parser.add_argument("--greedy-tokens", type=int, default=512, help="calibration tokens replayed by greedy allocation")
    parser.add_argument("--greedy-step", type=float, default=0.05)
    parser.add_argument("--greedy-top", type=float, default=0.9)
    parser.add_argument("--greedy-units", default="projection", choices=["projection", "input"])
    parser.add_argument("--greedy-search", default="exact", choices=["exact", "lazy"])
    parser.add_argument("--greedy-error", default="channel", choices=["channel", "squared"])
    parser.add_argument("--greedy-last", type=float, default=0.25, help="share of each sequence's last tokens scored")
    parser.add_argument("--prefill", default="sparse", choices=["sparse", "dense"],
                        help="teal/wina/cats: prompts thresholded too, or dense (TEAL's released evaluation)")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows")
    parser.add_argument("--languages", default=None, help="only these languages of the bundled corpora, for calibration "
                        "and held-out text alike (e.g. en: TEAL's evaluation is English); default: all")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per window")
    parser.add_argument("--agreement-prompts", type=int, default=8, help="held-out prompts for greedy agreement (0: none)")
    parser.add_argument("--agreement-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    path = Path(args.model)
    model_name = str(path if path.exists() else bundled.model_path(args.model))
    model, tokenizer = load_model(model_name, device="cpu", quiet=True)
    heldout = bundled.CORPUS_HELDOUT
    if args.languages:
        heldout = Path(tempfile.mkdtemp()) / "heldout.jsonl"
        heldout.write_text("\n".join(in_languages(bundled.CORPUS_HELDOUT, args.languages)) + "\n", encoding="utf-8")
    windows = eval_windows(tokenizer, heldout, max_windows=args.windows, max_length=args.max_length)
    dense = perplexity(model, windows)
    later = windows[len(windows) // 2 :] if len(windows) > 1 else windows  # prompts from other windows than the first
    prompts = [w[:, : min(32, w.shape[1] // 2)] for w in later[: args.agreement_prompts]]
    reference = agreement(model, prompts, args.agreement_tokens)[1] if prompts else None
    points = []
    with tempfile.TemporaryDirectory() as root:
        train = training_slice(Path(root) / "train.jsonl", args.train_docs, args.languages)
        atlas = None
        for config in args.configs.split(","):
            if config == "hot" and atlas is None:
                from neuronatlas.atlas import load_atlas
                from neuronatlas.profile import ProfileOptions, profile

                profile(model_name, train, Path(root) / "atlas", label_field="lang", device="cpu", quiet=True,
                        options=ProfileOptions(max_length=args.max_length, top_k=0, doc_sample=0, positions=False))
                atlas = load_atlas(Path(root) / "atlas")
            started = time.perf_counter()
            plan = make_plan(config, model, tokenizer, train, atlas, args)
            print(json.dumps({"config": config, "calibration_s": round(time.perf_counter() - started, 1)}), flush=True)
            points += measure(config, model, plan, windows, sparsities, dense, prompts, reference, args)
    print(f"\n{model_name}, {len(windows)} held-out windows ({args.languages or 'all languages'}) of <= {args.max_length} tokens, dense perplexity {dense:.2f}; "
          f"agreement over {len(prompts)} prompts x {args.agreement_tokens} tokens")
    print(table(points, sparsities))


if __name__ == "__main__":
    main()
