"""Quality of sparse plans on the bundled trained tiny-llama at 50% FFN sparsity, against random controls."""

from __future__ import annotations

import json

import pytest

from neuronatlas import bundled
from neuronatlas.loading import load_model
from neuronatlas.sparse import SparsifyOptions, sparsify
from neuronatlas.sparse.bench import eval_windows, quality

TINY_LLAMA = bundled.model_path("tiny-llama")
needs_bundled = pytest.mark.skipif(not (TINY_LLAMA / "config.json").exists(), reason="bundled model missing")
TRAIN_DOCS, EVAL_WINDOWS, MAX_LENGTH = 80, 24, 96


@pytest.fixture(scope="module")
def bundled_setup(tmp_path_factory):
    from neuronatlas.atlas import load_atlas
    from neuronatlas.profile import ProfileOptions, profile

    root = tmp_path_factory.mktemp("sparse-bundled")
    train = root / "train.jsonl"
    lines = bundled.CORPUS_TRAIN.read_text(encoding="utf-8").splitlines()
    train.write_text("\n".join(lines[:: max(1, len(lines) // TRAIN_DOCS)][:TRAIN_DOCS]) + "\n", encoding="utf-8")
    profile(str(TINY_LLAMA), train, root / "atlas", label_field="lang", device="cpu", quiet=True,
            options=ProfileOptions(max_length=MAX_LENGTH, top_k=0, doc_sample=0, positions=False))
    model, tokenizer = load_model(str(TINY_LLAMA), device="cpu", quiet=True)
    windows = eval_windows(tokenizer, bundled.CORPUS_HELDOUT, max_windows=EVAL_WINDOWS, max_length=MAX_LENGTH)
    return model, tokenizer, load_atlas(root / "atlas"), train, windows


@needs_bundled
@pytest.mark.parametrize("method", ["coreinfer", "hot", "teal", "wina", "cats", "moe"])
def test_half_sparsity_beats_random_control(bundled_setup, method):
    model, tokenizer, atlas, train, windows = bundled_setup
    options = SparsifyOptions(calib_tokens=2048, max_length=MAX_LENGTH)
    plan = sparsify(method, model, tokenizer, 0.5, atlas=atlas if method == "hot" else None,
                    corpus=train if method in ("teal", "wina", "cats") else None, options=options)
    result = quality(model, plan, windows, controls=True)
    print(f"\n{method} at 50%: " + json.dumps({k: round(v, 3) for k, v in result.items()}))
    assert result["ppl_sparse"] > result["ppl_dense"]  # skipping half the FFN costs something...
    assert result["ppl_sparse"] < result["ppl_random"]  # ...less than skipping a random half
