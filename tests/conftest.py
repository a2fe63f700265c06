"""Shared fixtures: a tiny tokenizer, tiny random models saved like real checkpoints, a corpus."""

from __future__ import annotations

import json
import random

import pytest
import torch

# Tiny models run fastest on one thread; more only wait on each other on a busy 2-core machine.
torch.set_num_threads(1)

WORDS = {
    "en": "the cat sat on a mat and the dog ran to the house while birds sang in trees".split(),
    "de": "der hund lief zum haus und die katze sass auf der matte während vögel sangen".split(),
    "ru": "кот сидел на коврике а собака бежала к дому пока птицы пели на деревьях".split(),
}


def make_tokenizer(directory):
    """A word-level tokenizer over WORDS with <s> prepended to every input, saved in ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for words in WORDS.values():
        for word in words:
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return fast


def make_llama(directory, seed: int = 0, layers: int = 2, positions: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def make_gpt2(directory, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_inner=41, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def write_corpus(path, documents: int = 30, seed: int = 0, max_words: int = 90) -> list[dict]:
    """JSONL of random sentences per language; some documents are longer than one window."""
    rng = random.Random(seed)
    rows = []
    for index in range(documents):
        lang = list(WORDS)[index % len(WORDS)]
        length = rng.randint(3, max_words)
        rows.append({"text": " ".join(rng.choice(WORDS[lang]) for _ in range(length)), "lang": lang})
    write_jsonl(path, rows)
    return rows


def write_jsonl(path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept as is."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def cli_fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI in-process; assert exit 2 and a single error line holding ``expected``."""
    from neuronatlas.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("neuronatlas: error: ")
    for part in expected:
        assert part in err, (part, err)
    return err


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def corpus_rows_and_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    return write_corpus(path), path


@pytest.fixture(scope="session")
def corpus_path(corpus_rows_and_path):
    return corpus_rows_and_path[1]


def window_close(shown, expected, largest: float | None = None, bits: int | None = None) -> bool:
    """Whether recorded window activations ``shown`` match ``expected`` z within the µ-law code's
    error at ``bits`` bits (default: the profile's): half a code step of each value (9.4% at 6 bits,
    2.2% at 8) plus that share of 1/255 of the window's largest |z| (``largest``, by default that of
    ``expected``; see exemplar_windows.py)."""
    import math

    import torch
    from neuronatlas.exemplar_windows import DEFAULT_BITS, MU, code_max

    shown, expected = torch.as_tensor(shown, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32)
    if largest is None:
        largest = float(expected.abs().max()) if len(expected) else 0.0
    error = math.expm1(math.log1p(MU) / (2 * code_max(bits or DEFAULT_BITS))) * 1.01  # and float32 rounding
    return torch.allclose(shown, expected, rtol=error, atol=error * largest / MU + 1e-4)
