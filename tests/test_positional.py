"""neuronatlas.methods.positional: variance reduction by position bucket."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from neuronatlas.atlas import Atlas
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.stats import SignalStats

sys.path.insert(0, str(Path(__file__).parent))
from detect_fixtures import atlas, reference  # noqa: E402,F401  (fixtures)


# ---- positional ---------------------------------------------------------------------------------


def hand_made_atlas(values_per_bucket: list[torch.Tensor], edges: list[int], max_length: int = 24) -> Atlas:
    """An atlas whose only statistics are the position buckets' moments of the given (n_b, D) values."""
    width = values_per_bucket[0].shape[1]
    meta = {"model": {"widths": [width], "name_or_path": "hand", "fingerprint": "0", "gated": False},
            "options": {"positions": True, "position_edges": edges, "max_length": max_length, "threshold": 0.0},
            "labels": ["all"]}
    atlas = Atlas(meta, {}, torch.zeros(1, dtype=torch.int64))
    atlas.positions = SignalStats([width], len(edges))
    for bucket, values in enumerate(values_per_bucket):
        atlas.positions.update(0, values, torch.full((len(values),), bucket), torch.arange(len(values)))
    atlas.position_tokens = torch.tensor([len(v) for v in values_per_bucket])
    return atlas


def test_positional_variance_reduction_on_a_hand_made_atlas():
    from neuronatlas.methods.positional import find_positional, position_variance_reduction

    generator = torch.Generator().manual_seed(0)
    sizes = [5, 5, 5, 5, 20, 40, 30]
    buckets = []
    for b, n in enumerate(sizes):
        constant = torch.full((n,), float(b))  # neuron 0: constant within each bucket -> VR 1
        flat = torch.randn(n, generator=generator) * 0 + 2.0  # neuron 1: the same everywhere -> VR 0
        noisy = b * 0.5 + torch.randn(n, generator=generator)  # neuron 2: somewhere in between
        peaked = torch.full((n,), 5.0 if b == 2 else 0.0)  # neuron 3: only at position 2
        buckets.append(torch.stack([constant, flat, noisy, peaked], 1))
    atlas = hand_made_atlas(buckets, [0, 1, 2, 3, 4, 8, 16])
    everything = torch.cat(buckets).double()
    labels = torch.cat([torch.full((n,), b) for b, n in enumerate(sizes)])
    within = sum(((everything[labels == b] - everything[labels == b].mean(0)) ** 2).sum(0) for b in range(len(sizes)))
    total = ((everything - everything.mean(0)) ** 2).sum(0)
    result = position_variance_reduction(atlas, 0)
    torch.testing.assert_close(result["vr"][[0, 2, 3]], (1 - within / total)[[0, 2, 3]], rtol=1e-9, atol=1e-9)
    assert float(result["vr"][1]) == 0.0
    found = find_positional(atlas, min_variance_explained=0.5)
    assert [(n.layer, n.index) for n in found.neurons][:2] in ([(0, 0), (0, 3)], [(0, 3), (0, 0)])
    assert (0, 1) not in {(n.layer, n.index) for n in found.neurons}
    assert found.params["details"]["0:3"]["peak_bucket"] == "2"
    assert found.params["details"]["0:0"]["peak_bucket"] == "16-23"
    assert found.params["details"]["0:3"]["peak_mean"] == 5.0
    # leaving out positions below 4 leaves neuron 3 constant (0) everywhere: not positional
    later = find_positional(atlas, min_variance_explained=0.5, min_position=4)
    assert (0, 3) not in {(n.layer, n.index) for n in later.neurons}


def test_positional_counts_the_neurons_that_only_the_first_token_makes_positional():
    """A first-token neuron (real models have many) is found, flagged by its VR without position 0, and
    counted in first_token_only; a range neuron keeps its VR without position 0."""
    from neuronatlas.methods.positional import find_positional, position_variance_reduction

    generator = torch.Generator().manual_seed(0)
    sizes = [20, 20, 20, 20, 80, 160]
    buckets = []
    for b, n in enumerate(sizes):
        first = torch.full((n,), 6.0 if b == 0 else 0.0) + 0.1 * torch.randn(n, generator=generator)
        ranged = b + 0.1 * torch.randn(n, generator=generator)  # rises with the position
        buckets.append(torch.stack([first, ranged], 1))
    atlas = hand_made_atlas(buckets, [0, 1, 2, 3, 4, 8])
    found = find_positional(atlas, min_variance_explained=0.5)
    assert {(n.layer, n.index) for n in found.neurons} == {(0, 0), (0, 1)}
    details = found.params["details"]
    without_first = position_variance_reduction(atlas, 0, min_position=1)["vr"]
    assert details["0:0"]["vr_after_first"] == pytest.approx(float(without_first[0])) and without_first[0] < 0.1
    assert details["0:1"]["vr_after_first"] == pytest.approx(float(without_first[1])) and without_first[1] > 0.9
    assert found.params["first_token_only"] == 1
    later = find_positional(atlas, min_variance_explained=0.5, min_position=1)
    assert [(n.layer, n.index) for n in later.neurons] == [(0, 1)] and "first_token_only" not in later.params


def test_find_positional_on_a_profiled_atlas(atlas, reference):
    from neuronatlas.methods.positional import find_positional

    found = find_positional(atlas, min_variance_explained=0.0)
    assert len(found) == sum(atlas.widths)
    best = found.neurons[0]
    values = torch.cat([w["z"][best.layer][:, best.index] for w in reference]).double()
    positions = torch.cat([torch.arange(len(w["z"][0])) for w in reference])
    buckets = torch.bucketize(positions, torch.tensor(atlas.position_edges), right=True) - 1
    within = sum(((values[buckets == b] - values[buckets == b].mean()) ** 2).sum() for b in buckets.unique())
    assert abs(best.score - float(1 - within / ((values - values.mean()) ** 2).sum())) < 1e-6
    with pytest.raises(NeuronAtlasError, match="between 0 and 1"):
        find_positional(atlas, min_variance_explained=2)
