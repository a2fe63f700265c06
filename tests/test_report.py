"""`neuronatlas report` (static pages) and the command line of serve and report."""

from __future__ import annotations

import json
import re
import socket

from conftest import cli_fails
from viewer_files import files, pages_script, viewer_lape, written_pages  # noqa: F401 (fixtures)

from neuronatlas.atlas import load_atlas
from neuronatlas.cli import main
from neuronatlas.viewer.report import report_size


# ---- report ---------------------------------------------------------------------------------


def test_report_writes_linked_static_pages(files, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(files["atlas"]), "-o", str(out), "--sets", str(files["sets"]),
                 "--neurons", str(files["sets"]), "--explanations", str(files["explanations"]), "--quiet"]) == 0
    chosen = sorted({(n.layer, n.index) for n in files["lape"].neurons})
    pages = sorted(out.glob("neuron/*/*.html"))
    assert len(pages) == len(chosen)
    layer, index = chosen[0]
    page = (out / "neuron" / str(layer) / f"{index}.html").read_text()
    for link in re.findall(r'(?:href|src)="([^"#?]+)"', page):
        assert (out / "neuron" / str(layer) / link).resolve().exists(), link
    assert "Live text" not in page
    index_script = (out / "static" / "search-index.js").read_text()
    assert index_script.startswith("window.NEURONATLAS_SEARCH = ")
    entries = json.loads(index_script[len("window.NEURONATLAS_SEARCH = "):].rstrip().rstrip(";"))["neurons"]
    assert [(e["layer"], e["index"]) for e in entries] == chosen
    assert (out / "index.html").exists() and (out / "search.html").exists()



def test_report_of_a_large_atlas_writes_a_chosen_subset(capsys, files, viewer_lape, tmp_path):
    out, max_pages = tmp_path / "report", 60
    atlas = load_atlas(files["atlas"])
    total = sum(atlas.widths)
    assert total > max_pages
    assert main(["report", str(files["atlas"]), "-o", str(out), "--max-pages", str(max_pages), "--quiet"]) == 0
    written = written_pages(out)
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert f"{len(written)} of {total:,} neurons have a page" in line and "--neurons SET.json" in line and "--all" in line
    lape = {(n.layer, n.index) for n in viewer_lape.neurons}
    per_layer = (max_pages - len(lape)) // len(atlas.widths)
    assert len(written) == len(lape) + per_layer * len(atlas.widths) <= max_pages
    assert lape <= set(written)
    for layer in range(len(atlas.widths)):  # the rest: the neurons of highest max activation, per layer
        others = [i for l, i in written if l == layer and (l, i) not in lape]
        peak = atlas.overall("max", layer)
        assert len(others) == per_layer
        assert float(peak[others].min()) >= max(float(peak[i]) for i in range(atlas.widths[layer])
                                                if i not in others and (layer, i) not in lape)
    script = pages_script(out)
    assert [(l, i) for l, row in enumerate(script["layers"]) for i in row] == written
    assert (script["written"], script["total"]) == (len(written), total)
    overview = (out / "index.html").read_text()
    assert f"{len(written)} of {total:,} neurons have a page" in overview and 'id="lape-heatmap"' in overview
    for link in re.findall(r'href="(neuron/[^"]+)"', overview):
        assert (out / link).exists(), link
    layer, index = written[0]
    page = (out / "neuron" / str(layer) / f"{index}.html").read_text()
    for link in re.findall(r'(?:href|src)="([^"#?]+)"', page):
        assert (out / "neuron" / str(layer) / link).resolve().exists(), link


def test_report_all_writes_every_page(capsys, files, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(files["atlas"]), "-o", str(out), "--all", "--max-pages", "5", "--quiet"]) == 0
    widths = load_atlas(files["atlas"]).widths
    assert len(written_pages(out)) == sum(widths)
    printed = capsys.readouterr().out
    assert f"all {sum(widths):,} neurons have a page" in printed
    size = report_size(out)  # shared CSS and JS, compact windows and histograms: pages stay small
    assert size["pages"] == sum(widths) and size["page_bytes"] <= 20_000
    assert f"{size['page_bytes'] / 1000:.1f} KB on average" in printed
    assert pages_script(out)["layers"] is None


# ---- the command line -----------------------------------------------------------------------------


def test_serve_refuses_a_folder_that_is_not_an_atlas(capsys, tmp_path):
    cli_fails(capsys, ["serve", str(tmp_path), "--port", "0"], str(tmp_path), "not an atlas")
    cli_fails(capsys, ["report", str(tmp_path), "-o", str(tmp_path / "r")], "not an atlas")


def test_report_refuses_too_many_pages_and_a_full_folder(capsys, files, tmp_path):
    atlas = str(files["atlas"])
    cli_fails(capsys, ["report", atlas, "-o", str(tmp_path / "r"), "--neurons", str(files["sets"]), "--max-pages", "10"],
              "--max-pages 10", f"{len({(n.layer, n.index) for n in files['lape'].neurons})} neurons")
    cli_fails(capsys, ["report", atlas, "-o", str(tmp_path / "r"), "--max-pages", "0"], "--max-pages must be at least 1")
    assert not (tmp_path / "r").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cli_fails(capsys, ["report", atlas, "-o", str(tmp_path / "full"), "--neurons", str(files["sets"])], "not empty", "--overwrite")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    cli_fails(capsys, ["report", atlas, "-o", atlas, "--overwrite", "--neurons", str(files["sets"])], "holds an atlas")


def test_serve_refuses_a_port_in_use(capsys, files):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cli_fails(capsys, ["serve", str(files["atlas"]), "--port", str(port)], f"port {port}", "in use", "--port")


def test_serve_refuses_bad_side_files(capsys, files, tmp_path):
    atlas = str(files["atlas"])
    cli_fails(capsys, ["serve", atlas, "--sets", str(tmp_path / "none.json")], "neuron set not found")
    other = json.loads(files["explanations"].read_text())
    other["model"]["fingerprint"] = "0123456789abcdef"
    (tmp_path / "other.json").write_text(json.dumps(other))
    cli_fails(capsys, ["serve", atlas, "--explanations", str(tmp_path / "other.json")], "another model")
    (tmp_path / "garbage.json").write_text("{not json")
    cli_fails(capsys, ["serve", atlas, "--eval", str(tmp_path / "garbage.json")], "not an evaluation file")
    cli_fails(capsys, ["serve", atlas, "--explanations", str(tmp_path / "garbage.json")], "not an explanations file")
