"""The families whose blocks differ most from Llama's, through the verbs a user runs on them.

Each is a tiny random model (``test_models.FAMILIES``) with a word-level tokenizer: profile, find
lape, evaluate with controls, steer, a TEAL plan over every linear layer (greedy allocation) and
bench. The plan at sparsity 0 must leave the logits as they are, and at 50% ``generate()`` must run
with the KV cache through the swapped projections (BLOOM's ALiBi, Falcon's and GPT-J's parallel
attention, CodeGen's interleaved qkv, GPT-BigCode's multi-query c_attn, MPT's Wqkv, Phi's partial
rotary, XGLM's scaled embeddings).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer
from test_models import tiny

from neuronatlas.cli import main
from neuronatlas.loading import load_model
from neuronatlas.sparse import apply_plan, load_plan

FAMILIES = ["bloom", "falcon", "gptj", "codegen", "gpt_bigcode", "mpt", "phi", "xglm", "starcoder2", "persimmon"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_runs_every_verb(name, corpus_path, tmp_path, capsys):
    folder = tmp_path / name
    tiny(name)[0].save_pretrained(folder)
    make_tokenizer(folder)
    model, common = str(folder), ["--device", "cpu", "--quiet"]
    atlas, lape, plan = tmp_path / "atlas", tmp_path / "lape.json", tmp_path / "plan"
    runs = [
        ["profile", "--model", model, "--corpus", str(corpus_path), "--label-field", "lang", "--max-length", "24",
         "--out", str(atlas), *common],
        # random weights: without the filter every family gets labelled neurons to evaluate and steer
        ["find", "lape", "--atlas", str(atlas), "--no-null", "--no-filter", "--top-rate", "0.2", "--out", str(lape)],
        ["evaluate", "--model", model, "--sets", str(lape), "--corpus", str(corpus_path), "--label-field", "lang",
         "--controls", "2", "--max-docs-per-label", "2", "--max-length", "24", "--out", str(tmp_path / "eval.json"),
         *common],
        ["steer", "--model", model, "--atlas", str(atlas), "--sets", str(lape), "--from", "de", "--to", "en",
         "--corpus", str(corpus_path), "--prompts", "1", "--calibration", "1", "--strength", "1", "--deactivate",
         "none", "--max-new-tokens", "3", *common],
        ["sparsify", "teal", "--model", model, "--corpus", str(corpus_path), "--sparsity", "0.5", "--scope", "all",
         "--allocation", "greedy", "--greedy-tokens", "32", "--calib-tokens", "256", "--out", str(plan),
         "--device", "cpu", "--quiet"],
        ["bench", "--model", model, "--plan", str(plan), "--corpus", str(corpus_path), "--runs", "1",
         "--new-tokens", "2", "--max-windows", "2", "--max-length", "24", "--json", str(tmp_path / "bench.json"),
         "--device", "cpu"],
    ]
    for argv in runs:
        assert main(argv) == 0, argv[:2]
        capsys.readouterr()
    assert json.loads((tmp_path / "eval.json").read_text())["params"]["controls"] == 2
    assert json.loads((tmp_path / "bench.json").read_text())["ppl_sparse"] > 0

    loaded, _ = load_model(model, device="cpu", quiet=True)
    sparse = load_plan(plan)
    assert sparse.options["prefill"] == "sparse" and "progress" not in sparse.options  # a display choice: not the plan's
    ids = torch.tensor([[1, 5, 9, 14, 7, 22, 30, 11]])
    with torch.no_grad():
        dense = loaded(ids).logits
        with apply_plan(loaded, sparse.at_sparsity(0.0)):
            torch.testing.assert_close(loaded(ids).logits, dense)
        with apply_plan(loaded, sparse):
            out = loaded.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
