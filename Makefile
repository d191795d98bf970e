# lightning-kd: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
OUT ?= outputs/demo

SEEDS ?= 0,1,2

.PHONY: install test test-slow demo bench reproduce report clean

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
	$(PY) benchmarks/bench_cache.py

reproduce: install   # the CIFAR-100 runs; ARGS="--slurm --partition gpu --time 24:00:00" writes the job array
	$(PY) -m lightning_kd.reproduce --seeds $(SEEDS) $(ARGS)

report: install   # the results table of the finished runs under outputs/
	$(PY) -m lightning_kd.report outputs --output outputs/report

clean:
	rm -rf $(VENV) outputs lightning_logs .pytest_cache
