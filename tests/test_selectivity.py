"""neuronatlas.methods.selectivity: AP / AUROC against sklearn, the kept neurons, bad inputs, the
bundled model."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronatlas.errors import NeuronAtlasError
from neuronatlas.profile import ProfileOptions, profile

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_jsonl  # noqa: E402
from detect_fixtures import atlas  # noqa: E402,F401  (a fixture)


# ---- selectivity --------------------------------------------------------------------------------


def test_ap_and_auroc_equal_sklearn(atlas):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from neuronatlas.methods.selectivity import selectivity_scores

    pool = atlas.docpool
    for label in ("de", "ru"):
        y = np.array([x == label for x in pool.labels])
        for metric, reference in (("ap", average_precision_score), ("auroc", roc_auc_score)):
            for pooling in ("mean", "max"):
                scores = selectivity_scores(atlas, label, metric, pooling)
                for layer in range(atlas.num_layers):
                    matrix = pool.matrix(pooling, layer)
                    for neuron in (0, 3, 17, 36):
                        expected = reference(y, matrix[:, neuron])
                        assert abs(float(scores[layer][neuron]) - expected) < 1e-12, (label, metric, layer, neuron)


def test_ties_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from neuronatlas.methods.selectivity import auroc, average_precision

    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (40, 6), generator=generator).float()  # many ties
    y = torch.arange(40) % 3 == 0
    ap, area = average_precision(scores, y), auroc(scores, y)
    for column in range(6):
        assert abs(float(ap[column]) - average_precision_score(y.numpy(), scores[:, column].numpy())) < 1e-12
        assert abs(float(area[column]) - roc_auc_score(y.numpy(), scores[:, column].numpy())) < 1e-12


def test_find_selective_keeps_the_top_scores_per_label(atlas):
    from neuronatlas.methods.selectivity import find_selective, selectivity_scores

    found = find_selective(atlas, metric="ap", top_k=5)
    assert found.labels == ["de", "en", "ru"] and len(found) == 15
    de = [n for n in found.neurons if n.label == "de"]
    flat = torch.cat(selectivity_scores(atlas, "de", "ap", "mean"))
    assert [n.score for n in de] == sorted(flat.tolist(), reverse=True)[:5]
    only = find_selective(atlas, label="ru", metric="auroc", pool="max", threshold=0.9)
    assert only.labels in (["ru"], []) and all(n.score >= 0.9 for n in only.neurons)
    # prob_diff from the token-level counts
    diff = find_selective(atlas, label="en", metric="prob_diff", top_k=3)
    k = atlas.label_index("en")
    n = diff.neurons[0]
    active = atlas.stat("active", n.layer).double()
    tokens = atlas.tokens_per_label.double()
    expected = active[k, n.index] / tokens[k] - (active[:, n.index].sum() - active[k, n.index]) / (tokens.sum() - tokens[k])
    assert abs(n.score - float(expected)) < 1e-12


def test_selectivity_bad_inputs(atlas):
    from neuronatlas.methods.selectivity import find_selective

    with pytest.raises(NeuronAtlasError, match="unknown label 'fr'"):
        find_selective(atlas, label="fr")
    with pytest.raises(NeuronAtlasError, match="unknown metric"):
        find_selective(atlas, metric="f1")
    with pytest.raises(NeuronAtlasError, match="unknown pool"):
        find_selective(atlas, pool="median")
    with pytest.raises(NeuronAtlasError, match="top-k"):
        find_selective(atlas, top_k=0)
    unlabelled = dataclasses.replace(atlas, meta={**atlas.meta, "labels": ["all"]})
    with pytest.raises(NeuronAtlasError, match="--label-field"):
        find_selective(unlabelled)
    without = dataclasses.replace(atlas, docpool=None)
    with pytest.raises(NeuronAtlasError, match="--doc-sample"):
        find_selective(without, metric="auroc")


# ---- the bundled model --------------------------------------------------------------------------


def test_bundled_tiny_llama_has_language_selective_neurons(tmp_path):
    from neuronatlas import bundled
    from neuronatlas.methods.selectivity import find_selective

    model_dir = bundled.model_path("tiny-llama")
    if not (model_dir / "config.json").exists() or not any(model_dir.glob("*.safetensors")):
        pytest.skip(f"the bundled tiny-llama is not in {model_dir} yet (scripts/train_bundled.py makes it)")
    rows = [json.loads(line) for line in bundled.CORPUS_HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    per_label: dict[str, int] = {}
    chosen = []
    for row in rows:  # 24 documents per language keep this test short
        if per_label.get(row["lang"], 0) < 24:
            per_label[row["lang"]] = per_label.get(row["lang"], 0) + 1
            chosen.append(row)
    corpus = tmp_path / "heldout-sample.jsonl"
    write_jsonl(corpus, chosen)
    atlas = profile(str(model_dir), corpus, tmp_path / "atlas", label_field="lang", device="cpu", quiet=True,
                    options=ProfileOptions(max_length=64, batch_size=16, top_k=0, gate=False))
    found = find_selective(atlas, metric="ap", top_k=1)
    best = {n.label: n.score for n in found.neurons}
    print("bundled tiny-llama best AP per language:", {k: round(v, 3) for k, v in sorted(best.items())})
    assert set(best) == set(per_label)
    assert all(score > 0.9 for score in best.values()), best
