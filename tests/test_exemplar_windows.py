"""Per-token activations around each exemplar: recorded at the end of a profile, kept by merge and re-save."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.atlas_merge import merge_atlases
from neuronatlas.exemplar_windows import has_windows, neuron_exemplars, with_window_values
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.models import locate_neurons
from neuronatlas.profile import ProfileOptions, profile

from conftest import window_close

RADIUS = 5


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(str(bundled.model_path("tiny-llama")), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    import json

    rows = [json.loads(line) for line in bundled.CORPUS_HELDOUT.read_text().splitlines()]
    folder = tmp_path_factory.mktemp("windows")
    parts = []
    for name, chunk in (("a", rows[:12]), ("b", rows[12:24]), ("ab", rows[:24])):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in chunk))
        parts.append(path)
    return parts


def _profile(model_and_tokenizer, corpus, out, radius=RADIUS):
    model, tokenizer = model_and_tokenizer
    options = ProfileOptions(batch_size=4, max_length=48, top_k=4, exemplar_radius=radius, doc_sample=0)
    return profile(model, corpus, out, tokenizer=tokenizer, label_field="lang", options=options, quiet=True)


@pytest.fixture(scope="module")
def atlas(model_and_tokenizer, corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "atlas"
    _profile(model_and_tokenizer, corpora[2], out)
    return load_atlas(out)


def test_the_exemplar_token_holds_the_exemplar_activation(atlas):
    table = with_window_values(pq.read_table(atlas.path / "exemplars.parquet")).to_pylist()
    assert table and all(len(row["window_activations"]) <= 2 * RADIUS + 1 for row in table)
    for row in table:
        at = row["pos"] - row["window_start"]
        assert 0 <= at < len(row["window_activations"])
        assert max(abs(value) for value in row["window_activations"]) <= row["window_scale"] * (1 + 1e-6)
        assert window_close([row["window_activations"][at]], [row["activation"]], row["window_scale"])  # µ-law codes


def recomputed_windows(atlas, model, end: str) -> list[tuple[dict, torch.Tensor]]:
    """(exemplar, z recomputed on its window alone over the tokens it shows) of two neurons' list ``end``."""
    neurons = locate_neurons(model)
    contexts = dict(zip(atlas.contexts["seq"].to_pylist(), atlas.contexts["token_ids"].to_pylist()))
    pairs = []
    for layer, neuron in ((0, 3), (atlas.num_layers - 1, 7)):
        for example in neuron_exemplars(atlas, layer, neuron, end=end):
            seen = {}
            with torch.inference_mode(), capture(neurons, lambda l, z: seen.setdefault(l, z[0, :, neuron].clone())):
                model(input_ids=torch.tensor([contexts[example["seq"]]]))
            lo = example["pos"] - example["focus"]
            recomputed = seen[layer][lo:lo + len(example["activations"])]
            # a token that widens the window to whole characters has no recorded value (None): left out
            known = [at for at, value in enumerate(example["activations"]) if value is not None]
            shown = dict(example, neuron=(layer, neuron), activations=[example["activations"][at] for at in known])
            pairs.append((shown, recomputed[known]))
    return pairs


def test_windows_equal_a_recomputation_on_the_window_alone(atlas, model_and_tokenizer):
    pairs = recomputed_windows(atlas, model_and_tokenizer[0], "top")
    for example, expected in pairs:
        assert window_close(example["activations"], expected)  # µ-law codes (the exemplar's own value exact)
        assert len(example["tokens"]) == len(example["token_ids"]) >= len(example["activations"])
        assert max(example["activations"]) == pytest.approx(example["activation"], abs=1e-4)
    assert len(pairs) == 8


def test_bottom_windows_equal_a_recomputation_and_are_the_most_negative_first(atlas, model_and_tokenizer):
    pairs = recomputed_windows(atlas, model_and_tokenizer[0], "bottom")
    for neuron in {example["neuron"] for example, _ in pairs}:
        values = [example["activation"] for example, _ in pairs if example["neuron"] == neuron]
        assert values == sorted(values) and all(value < 0 for value in values)
    for example, expected in pairs:
        assert window_close(example["activations"], expected)
        assert min(example["activations"]) == pytest.approx(example["activation"], abs=1e-4)
    assert len(pairs) >= 4


def test_merge_and_resave_keep_the_windows(model_and_tokenizer, corpora, tmp_path, atlas):
    first = _profile(model_and_tokenizer, corpora[0], tmp_path / "a")
    second = _profile(model_and_tokenizer, corpora[1], tmp_path / "b")
    merged = merge_atlases(load_atlas(tmp_path / "a"), load_atlas(tmp_path / "b"))
    merged.save(tmp_path / "merged")
    assert first.windows is not None and second.windows is not None
    whole = {(r["layer"], r["neuron"], r["seq"], r["pos"]): r["window_activations"]
             for r in with_window_values(pq.read_table(atlas.path / "exemplars.parquet")).to_pylist()}
    rows = with_window_values(pq.read_table(tmp_path / "merged" / "exemplars.parquet")).to_pylist()
    assert all(row["window_activations"] for row in rows)  # second's windows renumbered, none lost
    same = [(row["window_activations"], whole[key]) for row in rows
            if (key := (row["layer"], row["neuron"], row["seq"], row["pos"])) in whole]
    assert len(same) > 0.9 * len(rows)  # batching differs, so near-ties may pick other exemplars
    for merged_values, whole_values in same:
        assert window_close(merged_values, whole_values)
    bottom = pq.read_table(tmp_path / "merged" / "bottom_exemplars.parquet").to_pylist()
    assert bottom and all(row["window_codes"] for row in bottom)

def test_radius_zero_records_no_windows(model_and_tokenizer, corpora, tmp_path):
    _profile(model_and_tokenizer, corpora[0], tmp_path / "plain", radius=0)
    for name in ("exemplars.parquet", "bottom_exemplars.parquet"):
        assert not has_windows(pq.read_schema(tmp_path / "plain" / name).names)
    example = neuron_exemplars(load_atlas(tmp_path / "plain"), 0, 0)[0]
    assert example["activations"] == [pytest.approx(example["activation"])] and len(example["tokens"]) == 1


@pytest.mark.parametrize("bits, format_2", [(6, False), (8, False), (3, False), (8, True)])
def test_coded_windows_decode_alike_in_arrow_and_duckdb(tmp_path, bits, format_2):
    """Codes of every width decode within their bound in arrow and in duckdb; a table of format 2 (8-bit
    codes, no window_bits column) still decodes as 8 bits; fewer bits are measurably coarser."""
    import duckdb
    import numpy as np
    import torch

    from neuronatlas.exemplar_windows import code_max, window_sql, window_table
    from neuronatlas.stats import UID_POS_BITS

    rng = np.random.default_rng(0)
    radius = 3
    matrix = rng.normal(0, 3, (50, 2 * radius + 1)).astype(np.float16).astype(np.float32)
    matrix[3] = 0.0  # a window of zeros: scale 0, codes 0
    valid = rng.random(matrix.shape) > 0.2
    valid[:, radius] = True  # the exemplar itself
    valid[7] = False  # a window not recorded: no row
    window = torch.from_numpy(np.where(valid, matrix, np.nan)).half()[:, None]  # (D, k=1, W)
    values = torch.from_numpy(matrix[:, radius])[:, None]
    uid = (torch.arange(50) << UID_POS_BITS | 100)[:, None]  # seq = neuron, pos 100
    table = window_table([values], [uid], [window], radius, bits=bits)
    codes = np.concatenate(table["window_codes"].to_pylist())
    assert np.abs(codes).max() == code_max(bits)  # each window's largest |z| takes the top code
    if format_2:
        table = table.drop_columns(["window_bits"])
    kept = [row for row in range(50) if row != 7]
    assert table["seq"].to_pylist() == kept and table["window_start"].to_pylist() == [100 - radius + int(valid[row].argmax()) for row in kept]
    arrow = with_window_values(table)["window_activations"].to_pylist()
    for row, shown in zip(kept, arrow):
        assert window_close(shown, matrix[row][valid[row]], bits=bits)
    if bits < 8:
        assert not all(window_close(shown, matrix[row][valid[row]], bits=8) for row, shown in zip(kept, arrow))
    pq.write_table(table, tmp_path / "w.parquet")
    sql = duckdb.sql(f"select {window_sql(table.column_names)} from read_parquet('{tmp_path / 'w.parquet'}')")
    assert [np.allclose(a, b) for a, (_, b) in zip(arrow, sql.fetchall())] == [True] * 49


def test_float_windows_of_format_one_are_coded_when_saved_again(atlas, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(atlas.path, old)
    table = with_window_values(pq.read_table(old / "exemplars.parquet"))
    pq.write_table(table.drop_columns(["window_scale", "window_bits", "window_codes"]), old / "exemplars.parquet")  # as format 1 wrote
    load_atlas(old).save(tmp_path / "new")
    rows = with_window_values(pq.read_table(tmp_path / "new" / "exemplars.parquet")).to_pylist()
    before = table.to_pylist()
    assert len(rows) == len(before) and all(row["window_codes"] for row in rows)
    for row, floats in zip(rows, before):
        assert window_close(row["window_activations"], floats["window_activations"])
