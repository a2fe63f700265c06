"""Every family profiles the same statistics whether windows are padded (left) or not."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, write_corpus
from test_models import FAMILIES, tiny

from neuronatlas.profile import ProfileOptions, profile


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_padding_never_counts(name, tmp_path):
    corpus_path = tmp_path / "corpus.jsonl"
    write_corpus(corpus_path, documents=9, max_words=40)
    model = tiny(name)[0]
    model.save_pretrained(tmp_path / "model")
    make_tokenizer(tmp_path / "model")
    atlases = []
    for batch_size, side in ((1, "right"), (5, "left")):
        options = ProfileOptions(batch_size=batch_size, padding_side=side, max_length=20, top_k=3)
        atlases.append(profile(str(tmp_path / "model"), corpus_path, tmp_path / f"{side}{batch_size}",
                               label_field="lang", options=options, device="cpu", quiet=True))
    unpadded, padded = atlases
    assert torch.equal(padded.tokens_per_label, unpadded.tokens_per_label)
    for layer in range(unpadded.num_layers):
        torch.testing.assert_close(padded.stat("sum", layer), unpadded.stat("sum", layer), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(padded.stat("max", layer), unpadded.stat("max", layer), rtol=1e-4, atol=1e-4)
        assert (padded.stat("active", layer) - unpadded.stat("active", layer)).abs().sum() <= 2
