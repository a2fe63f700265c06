# Two commands for a fresh clone: `make demo` (install everything, run the demo), `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[all]"

demo: install
	$(PYTHON) -m neuronatlas demo

test:
	$(PYTHON) -m pytest tests

bench:
	$(PYTHON) benchmarks/profile_overhead.py
