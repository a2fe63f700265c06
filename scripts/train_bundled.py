#!/usr/bin/env python3
"""Train neuronatlas' bundled tokenizer and two tiny causal LMs on the bundled corpus.

Reads ``src/neuronatlas/bundled/corpus/{train,heldout}.jsonl`` (see ``build_corpus.py``),
trains a shared byte-level BPE tokenizer, then trains with plain PyTorch

* ``tiny-llama``: ``LlamaForCausalLM`` (gated SiLU MLP), and
* ``tiny-gpt2``:  ``GPT2LMHeadModel`` (gelu_new MLP),

on packed 128-token windows, reports the held-out loss per language and saves each
model with its tokenizer (``save_pretrained``, safetensors) under ``--out``:

    python scripts/train_bundled.py                         # both models, seed 0
    python scripts/train_bundled.py --model gpt2 --seed 1 --out /tmp/seed1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src" / "neuronatlas" / "bundled"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SEQ_LEN = 128

# Per-model hyper-parameters: 1500 steps x 16 windows x 128 tokens (3.1M tokens, ~4.4 epochs)
# take about 10 minutes on one otherwise idle core of the 2-core build machine.
DEFAULTS = {
    "llama": {"dir": "tiny-llama", "steps": 1500, "lr": 6e-3, "ffn": 384},
    "gpt2": {"dir": "tiny-gpt2", "steps": 1500, "lr": 8e-3, "ffn": 512},
}


# --------------------------------------------------------------------------- data


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with <s>, </s>, <pad> (ids 0, 1, 2); deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok: Tokenizer, add_bos: bool) -> PreTrainedTokenizerFast:
    """Wrap ``tok`` for transformers; with ``add_bos`` every input starts with <s>."""
    tok = Tokenizer.from_str(tok.to_str())  # independent copy
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=256
    )


def encode_docs(tok: PreTrainedTokenizerFast, texts: list[str], kind: str) -> list[int]:
    """Pack documents into one stream: Llama ``<s> text </s>``, GPT-2 ``text </s>``."""
    out: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids
        if kind == "llama":
            out.append(tok.bos_token_id)
        out += ids
        out.append(tok.eos_token_id)
    return out


def heldout_windows(tok, rows: list[dict], kind: str) -> dict[str, torch.Tensor]:
    """Per language, the packed held-out stream cut into non-overlapping SEQ_LEN windows."""
    by_lang = defaultdict(list)
    for row in rows:
        by_lang[row["lang"]].append(row["text"])
    out = {}
    for lang in sorted(by_lang):
        ids = torch.tensor(encode_docs(tok, by_lang[lang], kind))
        n = len(ids) // SEQ_LEN
        out[lang] = ids[: n * SEQ_LEN].view(n, SEQ_LEN)
    return out


# --------------------------------------------------------------------------- models


def make_model(kind: str, tok: PreTrainedTokenizerFast, ffn: int, init_range: float = 0.02):
    """The tiny model of ``kind`` ("llama" or "gpt2") for ``tok``'s vocabulary.

    ``ffn`` is the number of FFN neurons per layer; ``init_range`` is the std of the normal weight init (the HF default is 0.02).
    """
    common = {
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "initializer_range": init_range,
    }
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=128, intermediate_size=ffn, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            tie_word_embeddings=True, **common,
        )
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_inner=ffn, n_positions=256,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
    )
    return GPT2LMHeadModel(cfg)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not biases, norms or embeddings' 1-d parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model, windows: dict[str, torch.Tensor], batch: int = 64) -> dict[str, float]:
    """Mean next-token NLL (nats) per language over the held-out windows."""
    model.eval()
    losses = {}
    for lang, w in windows.items():
        total, count = 0.0, 0
        for i in range(0, len(w), batch):
            x = w[i : i + batch]
            n = x.numel() - len(x)  # predicted tokens in the batch
            total += model(input_ids=x, labels=x).loss.item() * n
            count += n
        losses[lang] = total / count
    model.train()
    return losses


def train(model, stream: torch.Tensor, args, steps: int, lr: float, windows) -> list[dict]:
    """Train on random packed windows of ``stream``; returns the log."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    warmup = max(1, int(0.05 * steps))
    offsets = torch.arange(SEQ_LEN)
    log, t0, running = [], time.time(), None
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        starts = torch.randint(0, len(stream) - SEQ_LEN, (args.batch,), generator=gen)
        x = stream[starts[:, None] + offsets]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        last = step + 1 == steps
        if (step + 1) % args.log_every == 0 or last:
            entry = {"step": step + 1, "train_loss": round(running, 4), "seconds": round(time.time() - t0, 1)}
            if (step + 1) % args.eval_every == 0 or last:
                held = evaluate(model, windows)
                entry["heldout"] = {k: round(v, 4) for k, v in held.items()}
            tok_s = (step + 1) * args.batch * SEQ_LEN / (time.time() - t0)
            print(json.dumps(entry), f"({tok_s:.0f} tok/s)", flush=True)
            log.append(entry)
    return log


def file_size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def save(model, tok: PreTrainedTokenizerFast, out: Path) -> None:
    """``save_pretrained`` model (safetensors) and tokenizer into ``out``, world-readable."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # Name the generic fast-tokenizer class, which transformers 4.x and 5.x both resolve.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)


def run(kind: str, base_tok: Tokenizer, train_rows, held_rows, args) -> dict:
    """Train, evaluate and save one model; returns its summary."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok = wrap_tokenizer(base_tok, add_bos=(kind == "llama"))
    stream = torch.tensor(encode_docs(tok, [r["text"] for r in train_rows], kind))
    windows = heldout_windows(tok, held_rows, kind)
    ffn = args.ffn or DEFAULTS[kind]["ffn"]
    model = make_model(kind, tok, ffn, args.init_range)
    n_params = sum(p.numel() for p in model.parameters())
    steps = args.steps or DEFAULTS[kind]["steps"]
    lr = args.lr or DEFAULTS[kind]["lr"]
    print(f"== {kind}: {n_params:,} parameters, {len(stream):,} training tokens, {steps} steps x {args.batch} x {SEQ_LEN}")

    t0 = time.time()
    log = train(model, stream, args, steps, lr, windows)
    seconds = time.time() - t0
    heldout = log[-1]["heldout"]

    out = args.out / DEFAULTS[kind]["dir"]
    save(model, tok, out)
    summary = {
        "model": kind, "seed": args.seed, "steps": steps, "batch": args.batch, "seq_len": SEQ_LEN,
        "ffn": ffn, "peak_lr": lr, "weight_decay": args.weight_decay, "init_range": args.init_range, "parameters": n_params,
        "training_tokens": len(stream), "train_seconds": round(seconds, 1),
        "final_train_loss": log[-1]["train_loss"], "heldout_loss": heldout,
        "heldout_loss_mean": round(sum(heldout.values()) / len(heldout), 4),
        "model_mb": round(file_size_mb(out / "model.safetensors"), 2),
        "torch": torch.__version__, "log": log,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"== {kind}: trained in {seconds / 60:.1f} min; final train loss {log[-1]['train_loss']:.3f}")
    print(f"   held-out loss per language: {json.dumps(heldout)} (mean {summary['heldout_loss_mean']:.3f})")
    print(f"   saved to {out} (model.safetensors {summary['model_mb']:.2f} MB)")
    return summary


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("llama", "gpt2", "both"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: per model, see DEFAULTS)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per model)")
    ap.add_argument("--ffn", type=int, default=None, help="FFN neurons per layer (default: per model)")
    ap.add_argument("--batch", type=int, default=16, help="windows per step (%(default)s)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--init-range", type=float, default=0.02, help="std of the weight init (%(default)s)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--corpus", type=Path, default=BUNDLED / "corpus")
    ap.add_argument("--out", type=Path, default=BUNDLED / "models", help="models go to OUT/tiny-llama, OUT/tiny-gpt2")
    # One thread: on the shared 2-core build machine two threads ran 3x slower per step.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_rows = read_jsonl(args.corpus / "train.jsonl")
    held_rows = read_jsonl(args.corpus / "heldout.jsonl")
    base_tok = train_tokenizer([r["text"] for r in train_rows], args.vocab_size)
    print(f"tokenizer: byte-level BPE, {base_tok.get_vocab_size()} tokens")
    kinds = ("llama", "gpt2") if args.model == "both" else (args.model,)
    for kind in kinds:
        run(kind, base_tok, train_rows, held_rows, args)


if __name__ == "__main__":
    main()
