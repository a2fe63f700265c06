"""The compiled decode kernel of thresholded projections equals the masked dense product."""

import pytest
import torch

from neuronatlas.sparse import row_kernel


def inputs(tokens: int, width: int = 96, out: int = 40):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, width, generator=generator)
    table = torch.randn(width, out, generator=generator)  # (in, out): row i = input channel i
    scale = torch.rand(width, generator=generator) + 0.5  # WINA's column norms
    return x, table, scale


@pytest.mark.parametrize("parallel_from", [1, 1 << 30])  # every call split over threads, or none
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_the_masked_dense_product(monkeypatch, parallel_from, tokens, weighted):
    monkeypatch.setattr(row_kernel, "PARALLEL_FROM", parallel_from)
    x, table, scale = inputs(tokens)
    scale = scale if weighted else None
    threshold = 0.7
    mask = (x.abs() * scale if weighted else x.abs()) > threshold
    out = row_kernel.thresholded_rows(x, threshold, scale, table, limit=x.numel())
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.allclose(out, (x * mask) @ table, atol=1e-5)


def test_too_many_rows_computes_nothing():
    x, table, _ = inputs(4)
    kept = int((x.abs() > 0.1).sum())
    assert row_kernel.thresholded_rows(x, 0.1, None, table, limit=kept - 1) is None
    assert row_kernel.thresholded_rows(x, 0.1, None, table, limit=kept) is not None


def test_runs_on_float32_cpu_tables_only():
    _, table, _ = inputs(1)
    assert row_kernel.supports(table)
    assert not row_kernel.supports(table.bfloat16()) and not row_kernel.supports(table.T)


@pytest.mark.parametrize("parallel_from", [1, 1 << 30])
@pytest.mark.parametrize("tokens", [1, 3])
def test_kept_row_products_equal_the_masked_dense_product(monkeypatch, parallel_from, tokens):
    """CATS's up projection: out[b, r] = W[r] · x[b] on the kept (b, r), 0 elsewhere; None beyond the limit."""
    monkeypatch.setattr(row_kernel, "PARALLEL_FROM", parallel_from)
    generator = torch.Generator().manual_seed(tokens)
    x, weight = torch.randn(tokens, 96, generator=generator), torch.randn(40, 96, generator=generator)  # weight (out, in)
    keep = torch.rand(tokens, 40, generator=generator) > 0.5
    out = row_kernel.kept_row_products(x, weight, keep, limit=40 * tokens)
    assert torch.allclose(out, (x @ weight.T) * keep, atol=1e-5)
    assert row_kernel.kept_row_products(x, weight, keep, limit=int(keep.sum()) - 1) is None


@pytest.mark.parametrize("parallel_from", [1, 1 << 30])
@pytest.mark.parametrize("tokens", [1, 4])
def test_row_products_equal_the_dense_product(monkeypatch, parallel_from, tokens):
    """The compacted weights of hot and CoreInfer: every row's dot products with every token."""
    monkeypatch.setattr(row_kernel, "PARALLEL_FROM", parallel_from)
    generator = torch.Generator().manual_seed(tokens)
    x, weight = torch.randn(tokens, 96, generator=generator), torch.randn(40, 96, generator=generator)
    assert torch.allclose(row_kernel.row_products(x, weight), x @ weight.T, atol=1e-5)


def test_row_products_run_only_where_they_pay():
    """Large float32 CPU weights only: a small one sits in the cache, where torch's product is faster."""
    large = torch.randn(row_kernel.MIN_PRODUCT_WEIGHTS // 64, 64)
    assert row_kernel.products_pay(large)
    assert not row_kernel.products_pay(large[:-1]) and not row_kernel.products_pay(large.bfloat16())
    assert not row_kernel.products_pay(None)
