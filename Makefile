# lightning-kd: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
OUT ?= outputs/demo

.PHONY: install test test-slow demo bench reproduce clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]" $(TORCH_PINS)
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(PY) -m lightning_kd.demo --output $(OUT)

bench: install
	$(PY) benchmarks/bench_overhead.py --options
	$(PY) benchmarks/bench_data.py

reproduce: install
	$(PY) -m lightning_kd.reproduce

clean:
	rm -rf $(VENV) outputs lightning_logs .pytest_cache
