# Two entry points that work on a fresh machine with only Python 3.10+:
#   make demo   installs the project, writes the tiny random-weight model, renders the
#               example manifest through `vcut run`, and counts SVD-XT MACs.
#   make test   installs the project (and a Prometheus server for the metrics test, headless
#               Chromium for the job-report test) and runs the whole test suite (what CI runs).
#   make test-fast  the developer loop (under 3 minutes on 2 cores): ruff, then every test not
#               marked `slow` (the Ray, subprocess, torch.compile, browser and Prometheus
#               integration tests are); needs neither Prometheus nor Chromium.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VCUT := $(VENV)/bin/vcut
# The CPU build of torch; a range in pyproject.toml admits it, so pip adds nothing bigger.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint prometheus chromium clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,bench,compare]"
	touch $@

prometheus:
	@bash scripts/install-prometheus.sh

chromium:
	@bash scripts/install-chromium.sh

demo: install
	$(VCUT) tiny-model demo-out/tiny-svd
	$(VCUT) run examples/manifest.parquet --out demo-out/run --model demo-out/tiny-svd --config examples/tiny-job.yaml
	$(VCUT) macs --model svd-xt --height 576 --width 1024 --num-frames 25 --steps 25

test: install prometheus chromium
	$(VENV)/bin/ruff check vcut pipeline jobs tests benchmarks examples
	$(PY) -m pytest -q

test-fast: install
	$(VENV)/bin/ruff check vcut pipeline jobs tests benchmarks examples
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check vcut pipeline jobs tests benchmarks examples

clean:
	rm -rf $(VENV) demo-out .pytest_cache
