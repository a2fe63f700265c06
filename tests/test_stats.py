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
    assert list(whole.exemplar_lists()) == [(0, "top"), (1, "top")] and whole.has("hist") and not whole.has("missing")


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


def _brute_bottom(values: torch.Tensor, uids: torch.Tensor, k: int) -> tuple[list, list]:
    """Per neuron, the k (value asc, uid asc) smallest: values and uids."""
    out_values, out_uids = [], []
    for column in values.T:
        order = sorted(range(len(column)), key=lambda i: (float(column[i]), int(uids[i])))[:k]
        out_values.append([float(column[i]) for i in order])
        out_uids.append([int(uids[i]) for i in order])
    return out_values, out_uids


def test_bottom_exemplars_are_the_smallest_by_value_then_uid_whatever_the_batching():
    generator = torch.Generator().manual_seed(1)
    values = (torch.randn(300, 6, generator=generator) * 2).round() / 2  # many ties: uid breaks them
    uids = make_uid(torch.arange(300) // 10, torch.arange(300) % 10)
    labels = torch.zeros(300, dtype=torch.long)
    expected = _brute_bottom(values, uids, 5)
    for batch in (1, 7, 64, 300):  # small batches take the candidate path once the lists are full
        stats = SignalStats([6], 1, top_k=3, bottom_k=5)
        for start in range(0, 300, batch):
            stats.update(0, values[start:start + batch], labels[start:start + batch], uids[start:start + batch])
        assert stats.get("bottom_values", 0).tolist() == expected[0], batch
        assert stats.get("bottom_uid", 0).tolist() == expected[1], batch
        top = sorted(range(300), key=lambda i: (-float(values[i, 0]), int(uids[i])))[:3]
        assert stats.get("top_uid", 0)[0].tolist() == [int(uids[i]) for i in top]  # the top list is untouched


def test_bottom_lists_merge_like_the_whole_and_keep_their_windows_with_them():
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(80, 4, generator=generator)
    uids = make_uid(torch.arange(80) // 8, torch.arange(80) % 8)
    labels = torch.zeros(80, dtype=torch.long)

    def run(part: slice) -> SignalStats:
        stats = SignalStats([4], 1, top_k=2, bottom_k=3, radius=1)
        stats.update(0, values[part], labels[part], uids[part])
        return stats

    whole, merged = run(slice(0, 80)), run(slice(0, 30)).merge_(run(slice(30, 80)))
    for field in ("bottom_values", "bottom_uid", "top_uid"):
        assert torch.equal(merged.get(field, 0), whole.get(field, 0)), field
    assert merged.get("bottom_window", 0).shape == (4, 3, 3)  # NaN windows without a source, moved by the merge
    assert list(whole.exemplar_lists()) == [(0, "top"), (0, "bottom")]
    assert set(whole.drop_windows()) == {"top", "bottom"} and not whole.has("bottom_window")
