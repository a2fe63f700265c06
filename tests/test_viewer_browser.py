"""The viewer in a real browser: `neuronatlas serve` in a subprocess, headless chromium through Playwright.

Each test checks what a person would see and saves a screenshot in tests/artifacts/.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from viewer_files import TINY_LLAMA, build_viewer_files, cyrillic_neurons, hostile_neuron, readable_copy

from neuronatlas.atlas import load_atlas
from neuronatlas.cli import main
from neuronatlas.methods import find_lape
from neuronatlas.viewer.data import VIEWER_LAPE

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make install` installs it)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if not (TINY_LLAMA / "config.json").exists():
        pytest.skip(f"the bundled tiny-llama is not there ({TINY_LLAMA})")
    return build_viewer_files(tmp_path_factory)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(atlas: Path, *options: str):
    """`neuronatlas serve ATLAS` on a free port; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "neuronatlas", "serve", str(atlas), "--port", str(port), *options, "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the server stopped: {process.stderr.read()}")
            try:
                urllib.request.urlopen(f"{url}/api/summary", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(files):
    with serving(files["atlas"], "--sets", str(files["sets"]), "--explanations", str(files["explanations"]),
                 "--eval", str(files["eval"])) as url:
        yield url


@pytest.fixture(scope="module")
def viewer_lape(files):
    return find_lape(load_atlas(files["atlas"]))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    """A fresh page that records every dialog (alert, confirm ...) a script opens."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.dialogs = []
    opened.on("dialog", lambda dialog: (opened.dialogs.append(dialog.message), dialog.dismiss()))
    yield opened
    context.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"viewer-{name}.png"), full_page=True)


def api(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def test_overview(page, server, files):
    page.goto(server + "/")
    assert page.locator("h1").inner_text() == "Atlas overview"
    assert str(TINY_LLAMA) in page.locator("table.facts").inner_text()
    summary = api(server + "/api/summary")
    rows = page.locator("#layers tr")
    assert rows.count() == summary["layers"] + 1
    first = rows.nth(1).inner_text().split()
    assert first[:2] == ["0", str(summary["neurons_per_layer"][0])]
    assert float(first[2]) == pytest.approx(100 * summary["activation_rate_per_layer"][0], abs=0.006)
    assert page.locator("svg.plot").count() >= 2
    evaluation = json.loads(files["eval"].read_text())
    label = evaluation["set_labels"][0]
    assert f"{evaluation['delta'][label][label]:+.4f}" in page.locator("main").inner_text()
    assert page.locator("#lape-heatmap").is_visible() and VIEWER_LAPE in page.locator("main").inner_text()
    screenshot(page, "overview")
    assert not page.dialogs


def test_neuron_page(page, server):
    page.goto(server + "/")
    page.fill("form.jump input[name=layer]", "2")
    page.fill("form.jump input[name=index]", "5")
    page.click("form.jump button")
    page.wait_for_url("**/neuron/2/5")
    assert page.locator("#neuron-name").inner_text() == "L2/5"
    record = api(server + "/api/neuron/2/5")
    rows = page.locator("#exemplars tr")
    shown = [item for item in record["exemplars"] if item["merged_into"] is None]  # near-duplicates merged
    assert rows.count() == len(shown) + 1
    best = record["exemplars"][0]
    assert rows.nth(1).locator("td").nth(1).inner_text() == f"{best['activation']:.3f}"
    peak = rows.nth(1).locator(".tok.peak")  # the span of whole characters that holds the peak token
    assert peak.inner_text() in best["text"]
    scale = float(page.locator("#exemplars").get_attribute("data-scale"))  # values in thousandths of it
    assert float(peak.get_attribute("title")) == pytest.approx(best["activations"][best["peak"]], abs=scale / 1000)
    colour = peak.evaluate("node => getComputedStyle(node).backgroundColor")
    assert colour.startswith("rgba(230, 90, 20") and colour != "rgba(0, 0, 0, 0)"
    assert best["text"].strip() in rows.nth(1).inner_text()
    assert page.locator("#vocab ol").first.locator("li").count() == len(record["top_tokens"]) > 0
    assert page.locator("#label-profile tr").count() == len(record["label_probability"]) + 1
    assert page.locator("svg.hist rect").count() > 0  # drawn with the page's own edges
    screenshot(page, "neuron")
    page.click("#next")
    page.wait_for_url("**/neuron/2/6")
    page.click("#random")
    page.wait_for_url("**/neuron/*/*")
    assert page.locator("#neuron-name").inner_text().startswith("L")
    assert not page.dialogs


def test_search(page, server, files, viewer_lape):
    label = files["lape"].labels[0]
    page.goto(server + "/search")
    page.select_option("#search-by", "label")
    page.fill("#search-q", label)
    page.click("#search-form button")
    page.wait_for_url("**/search?by=label*")
    expected = len(files["lape"].for_label(label)) + len([n for n in viewer_lape.neurons if n.label == label])
    assert page.locator("#search-count").inner_text().startswith(f"{expected:,} neuron")
    screenshot(page, "search")
    page.locator("#results a").first.click()
    page.wait_for_url("**/neuron/*/*")
    assert label in page.locator("#sets").inner_text()
    page.goto(server + "/search?by=token&q=the")
    assert page.locator("#results tr").count() > 1
    assert not page.dialogs


def test_live_text(page, server):
    page.goto(server + "/live?layer=2&index=9")
    text = "Das Haus ist groß und der Hund schläft."
    page.fill("#live-text", text)
    page.click("#live-form button")
    page.wait_for_selector("#live-tokens")
    tokens = page.locator("#live-tokens .tok")
    assert tokens.count() > 5
    assert "".join(tokens.all_inner_texts()).replace("<s>", "").strip() == text
    assert page.locator("#live-result p").first.inner_text().startswith("L2/9: max ")
    values = [float(title.rsplit(": ", 1)[1]) for title in (tokens.nth(i).get_attribute("title") for i in range(tokens.count()))]
    strongest = max(range(len(values)), key=lambda i: abs(values[i]))
    alpha = tokens.nth(strongest).evaluate("node => getComputedStyle(node).backgroundColor")
    assert alpha.endswith(", 0.85)")  # the largest |activation| gets the full colour
    assert page.locator("#live-top tr").count() == 21
    page.locator("#live-top button").nth(1).click()
    second = page.locator("#live-top tr").nth(2).locator("a").inner_text()
    assert page.locator("#live-result p").first.inner_text().startswith(f"{second}: max ")
    screenshot(page, "live")
    assert not page.dialogs


def test_hostile_text_is_shown_and_runs_nothing(page, server, files):
    for fragment in ("<script", "<img src=x"):
        layer, index, window = hostile_neuron(files["atlas"], fragment)
        page.goto(f"{server}/neuron/{layer}/{index}")
        shown = page.locator("#exemplars").inner_text()
        assert window.strip() in shown and fragment in shown
        assert page.locator("img").count() == 0 and page.locator("script").count() == 1
    screenshot(page, "hostile-exemplar")
    first = files["explained"][0]
    page.goto(f"{server}/neuron/{first.layer}/{first.index}")
    assert 'onerror=alert("xss-expl")' in page.locator(".explanation-text").inner_text()
    page.goto(server + "/search?by=explanation&q=onerror")
    assert "<img src=x" in page.locator("#results").inner_text()
    page.goto(server + "/live")
    page.fill("#live-text", '"><img src=x onerror=alert("live")> <script>alert("live")</script>')
    page.click("#live-form button")
    page.wait_for_selector("#live-tokens")
    assert "<script>" in page.locator("#live-tokens").inner_text()
    assert page.locator("img").count() == 0
    page.wait_for_timeout(300)  # an onerror handler would fire by now
    assert page.dialogs == []


def test_missing_neuron_page(page, server):
    response = page.goto(server + "/neuron/0/99999999")
    assert response.status == 404
    assert "out of range" in page.locator("main").inner_text()
    screenshot(page, "404")


def test_static_report(page, files, viewer_lape, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(files["atlas"]), "-o", str(out), "--sets", str(files["sets"]), "--neurons",
                 str(files["sets"]), "--explanations", str(files["explanations"]), "--quiet"]) == 0
    label = files["lape"].labels[0]
    written = {(n.layer, n.index) for n in files["lape"].neurons}
    page.goto((out / "index.html").as_uri())
    assert page.locator("h1").inner_text() == "Atlas overview"
    assert page.locator("#report-pages").inner_text().startswith(f"{len(written)} of ")
    page.click("nav >> text=Search")
    page.select_option("#search-by", "label")
    page.fill("#search-q", label)
    page.click("#search-form button")
    page.wait_for_selector("#results a")
    # The report's search holds the neurons with a page: the set's, and the viewer's LAPE among them.
    expected = len(files["lape"].for_label(label)) + len([n for n in viewer_lape.neurons
                                                          if n.label == label and (n.layer, n.index) in written])
    assert page.locator("#search-count").inner_text().startswith(f"{expected:,} neuron")
    page.goto((out / "index.html").as_uri())
    page.locator("table.heatmap").get_by_role("link", name=label, exact=True).first.click()  # the label's search
    page.wait_for_selector("#results a")
    assert page.locator("#search-count").inner_text().startswith(f"{expected:,} neuron")
    page.locator("#results a").first.click()
    page.wait_for_selector("#exemplars")
    assert page.locator("#exemplars .tok.peak").count() > 0
    assert page.locator("svg.hist rect").count() > 0  # drawn with the edges of the report's pages.js
    screenshot(page, "report-neuron")
    first = sorted({(n.layer, n.index) for n in files["lape"].neurons})[0]
    page.fill("form.jump input[name=layer]", str(first[0]))
    page.fill("form.jump input[name=index]", str(first[1]))
    page.click("form.jump button")
    page.wait_for_url(f"**/neuron/{first[0]}/{first[1]}.html")
    assert page.locator("#neuron-name").inner_text() == f"L{first[0]}/{first[1]}"
    missing = next((0, i) for i in range(load_atlas(files["atlas"]).widths[0]) if (0, i) not in written)
    page.fill("form.jump input[name=layer]", "0")
    page.fill("form.jump input[name=index]", str(missing[1]))
    page.click("form.jump button")
    note = page.locator("#jump-note")
    note.wait_for(state="visible")
    assert f"L0/{missing[1]} has no page in this report" in note.inner_text() and "--all" in note.inner_text()
    assert page.locator("#neuron-name").inner_text() == f"L{first[0]}/{first[1]}"  # stayed on the page
    screenshot(page, "report-missing-page")
    assert not page.dialogs


def test_cyrillic_text_reads_without_replacement_characters(page, files, tmp_path_factory):
    from neuronatlas.viewer.data import AtlasData

    atlas = readable_copy(files, tmp_path_factory)
    chosen = cyrillic_neurons(AtlasData(atlas), count=2)
    assert chosen
    with serving(atlas) as url:
        for layer, index in chosen:
            page.goto(f"{url}/neuron/{layer}/{index}")
            shown = page.locator("body").inner_text()
            titles = page.locator("#exemplars .tok").evaluate_all("nodes => nodes.map((node) => node.title).join(' ')")
            assert "\ufffd" not in shown + titles
            assert any(item["text"].strip() in shown for item in api(f"{url}/api/neuron/{layer}/{index}")["exemplars"])
        screenshot(page, "cyrillic-neuron")
        text = "Привет, Пётр! Это тест 🎉"
        page.goto(f"{url}/live?layer=1&index=2")
        page.fill("#live-text", text)
        page.click("#live-form button")
        page.wait_for_selector("#live-tokens")
        shown = page.locator("#live-tokens").inner_text()
        assert "\ufffd" not in shown and shown.replace("<s>", "").strip() == text
        screenshot(page, "cyrillic-live")
    assert not page.dialogs
