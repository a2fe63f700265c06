"""The CPU kernel of the statistics gives what the torch code gives, field by field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronatlas import stats_kernel
from neuronatlas.stats import SignalStats, WindowSource, default_hist_edges, make_uid


def batches(seed: int, count: int, rows: int, width: int, labels: int, specials: bool):
    """Batches of padded rows: values with ties (and inf / NaN when ``specials``), labels with -1
    for padding, ascending uids, position buckets and a window source over (B, T) slots."""
    generator = torch.Generator().manual_seed(seed)
    T = 8
    B = rows // T
    for index in range(count):
        values = (torch.randn(B * T, width, generator=generator) * 3).round() / 4  # many ties
        values[:, 0] = 0.0  # a constant (dead) neuron: ties everywhere
        if specials:
            spots = torch.randint(0, B * T, (6,), generator=generator)
            values[spots[:2], 1] = float("inf")
            values[spots[2:4], 2] = float("-inf")
            values[spots[4:], 3] = float("nan")
            values[:, 4] = float("-inf")  # a list that fills with -inf: ties by uid all the way
        real = torch.rand(B, T, generator=generator) > 0.25
        real[:, 0] = True
        label = torch.randint(0, labels, (B,), generator=generator)
        flat_labels = torch.where(real, label[:, None], -1).view(-1)
        seq = torch.arange(B) + index * B
        uids = make_uid(seq[:, None].expand(B, T), torch.arange(T).expand(B, T)).reshape(-1)
        buckets = torch.arange(T).clamp(max=3).expand(B, T).reshape(-1)
        slots = torch.arange(B * T)
        windows = WindowSource(slots // T, slots % T, real, 2, values.view(B, T, width))
        yield values, flat_labels, uids, buckets, windows


def run(kernel: bool, monkeypatch, specials: bool, top_k: int, bottom_k: int, rows: int) -> tuple[SignalStats, SignalStats]:
    monkeypatch.setenv(stats_kernel.DISABLE_VARIABLE, "1" if kernel else "0")
    stats = SignalStats([9], 3, threshold=0.2, hist_edges=default_hist_edges(), top_k=top_k, radius=2,
                        bottom_k=bottom_k)
    positions = SignalStats([9], 4, threshold=0.2)
    for values, labels, uids, buckets, windows in batches(5, 12, rows, 9, 3, specials):
        stats.update(0, values, labels, uids, windows, (positions, buckets))
    return stats, positions


@pytest.mark.parametrize("specials", [False, True])
@pytest.mark.parametrize("rows", [16, 256])  # few tokens a batch: the kernel's few-candidates path; many: dense
def test_kernel_equals_the_torch_code(monkeypatch, specials, rows):
    (fused, fused_positions), (plain, plain_positions) = (run(kernel, monkeypatch, specials, 4, 3, rows)
                                                          for kernel in (True, False))
    for mine, theirs in ((fused, plain), (fused_positions, plain_positions)):
        assert mine.tensors.keys() == theirs.tensors.keys()
        for key, tensor in theirs.tensors.items():
            if key.startswith("sum"):  # float64 sums of float32 values: equal to rounding
                torch.testing.assert_close(mine.tensors[key], tensor, rtol=1e-12, atol=1e-12, equal_nan=True)
            else:
                assert torch.equal(mine.tensors[key].nan_to_num(7.0), tensor.nan_to_num(7.0)), key
    assert int(fused.get("active", 0).sum()) > 0 and int(fused.get("hist", 0).sum()) > 0
    assert (fused.get("top_uid", 0) >= 0).all()  # the lists filled: the comparison compared exemplars


def test_half_bits_round_like_torch_clamp_then_half():
    """The float16 bits the exemplar windows store (stats_kernel.half_of) are torch's clamp-then-half
    (checked once on all 2**32 float32 patterns; here the edges and a million random patterns)."""
    generator = torch.Generator().manual_seed(3)
    spread = torch.randn(4000, generator=generator) * torch.logspace(-9, 6, 4000)  # subnormal halves to overflow
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-24, 3 * 2**-25, 2**-25, 65504.0, 65519.0, 65520.0, 1e9,
                         float("inf"), -float("inf"), -0.0, 0.0, 6.1e-5])
    patterns = torch.randint(-2**31, 2**31, (2**20,), generator=generator, dtype=torch.int64).to(torch.int32).view(torch.float32)
    values = torch.cat([spread, -spread, ties, -ties, patterns])
    expected = values.clamp(-65504.0, 65504.0).half().view(torch.int16).numpy().view("uint16")
    got = np.empty(len(values), np.uint16)
    stats_kernel.half_bits(values.numpy(), got)
    nan = values.isnan().numpy()
    assert nan.any() and np.isnan(got[nan].view(np.float16)).all()  # NaN stays NaN (its payload may differ)
    assert got[~nan].tolist() == expected[~nan].tolist()
