"""SignalStats on its own: the merge rules (REDUCTIONS), row moves, device moves, uids."""

from __future__ import annotations

import torch

from neuronatlas.stats import REDUCTIONS, SignalStats, default_hist_edges, make_uid, split_uid, uid_offset


def filled(values: torch.Tensor, labels: torch.Tensor, uids: torch.Tensor) -> SignalStats:
    stats = SignalStats([5, 3], 2, threshold=0.1, hist_edges=default_hist_edges(), top_k=4)
    for layer, width in enumerate(stats.widths):
        stats.update(layer, values[:, :width], labels, uids)
    return stats


def test_merged_halves_equal_the_whole_field_by_field():
    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(40, 5, generator=generator) * 2).round() / 2  # exact sums; ties broken by uid
    labels = torch.randint(0, 2, (40,), generator=generator)
    uids = make_uid(torch.arange(40) // 8, torch.arange(40) % 8)
    whole = filled(values, labels, uids)
    first, second = filled(values[:24], labels[:24], uids[:24]), filled(values[24:], labels[24:], uids[24:])
    merged = first.merge_(second)
    for key in whole.tensors:
        assert key.split(".")[0] in REDUCTIONS
        assert torch.equal(merged.tensors[key], whole.tensors[key]), key
    assert {reduction for _key, _tensor, reduction in whole.reduced()} == {"sum", "min", "max"}
    assert list(whole.top_layers()) == [0, 1] and whole.has("hist") and not whole.has("missing")


def test_uid_offset_numbers_the_second_part_after_the_first():
    seq, pos = split_uid(make_uid(torch.tensor([0, 7]), torch.tensor([3, 5])) + uid_offset(10))
    assert seq.tolist() == [10, 17] and pos.tolist() == [3, 5]
    empty = split_uid(torch.tensor([-1]))[0]
    assert empty.tolist() == [-1]


def test_with_rows_moves_label_rows_and_leaves_the_others_empty():
    stats = filled(torch.ones(4, 5), torch.tensor([0, 0, 1, 1]), torch.arange(4))
    spread = stats.with_rows(torch.tensor([2, 0]), 3)
    assert spread.get("active", 0).tolist() == [[2] * 5, [0] * 5, [2] * 5]
    assert spread.get("min", 1)[1].tolist() == [float("inf")] * 3
    assert torch.equal(spread.get("top_uid", 0), stats.get("top_uid", 0))


def test_to_moves_every_tensor_and_the_edges():
    stats = filled(torch.ones(2, 5), torch.tensor([0, 1]), torch.arange(2)).to_("meta")
    assert all(tensor.device.type == "meta" for tensor in stats.tensors.values())
    assert stats.hist_edges.device.type == "meta"
