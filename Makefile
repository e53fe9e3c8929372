# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch; GPU users install their own torch first (pyproject takes a range).
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-families test-fast bench bench-scale bench-families bench-eval bench-reg rebuild-tiny docs docs-serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,wandb]"
	touch $@

install: $(VENV)/.installed

## Edit the tiny BLIP-2 with FT on E-VQA-mini (the first time: generates the mini world and copies
## in the shipped tiny BLIP-2; nothing is pretrained).
demo: install
	$(PY) run.py

## The whole test suite, slow tests and every family's shipped build included (what CI runs); the
## 25 slowest are listed, to keep CI in budget.
test: install
	$(PY) -m pytest -q --durations=25

## Only the tests on the shipped builds of tiny LLaVA, MiniGPT-4 and Qwen2-VL (marker `families`).
test-families: install
	$(PY) -m pytest -q -m families --durations=10

## Everything but the tests marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

## Print the speed and memory figures the issues set as targets.
bench: install
	$(PY) benchmarks/spine.py

## Parameters and forward/backward time of each tiny backbone family.
bench-families: install
	$(PY) benchmarks/families.py

## Parallel sweeps (joblib vs basic launcher) and one run over 2 CPU processes (accelerate).
bench-scale: install
	$(PY) benchmarks/scale.py

## Locality conventions, teacher-forced vs generated answers, and evaluation cost per mode.
bench-eval: install
	$(PY) benchmarks/evaluation.py

## ODEdit and ASAM on FT: cost against FT alone, and the metrics over 5 seeds (--ablations for Tables 3/4).
bench-reg: install
	$(PY) benchmarks/regularizers.py

## Rebuild the shipped tiny builds here (the four families and their in-context stages, about two
## hours on 2 cores) and compare them, weight by weight, with the shipped set; ARGS=--ship makes
## the rebuilt builds the shipped set (ARGS="--cache DIR" reuses a folder's finished builds).
rebuild-tiny: install
	$(PY) benchmarks/rebuild_tiny.py $(ARGS)

## The documentation site (docs/, mkdocs.yml) into site/; fails on a broken link or a page
## missing from the nav. `make docs-serve` serves it at http://127.0.0.1:8000 while you edit.
docs: install
	$(PY) -m mkdocs build --strict

docs-serve: install
	$(PY) -m mkdocs serve

clean:
	rm -rf outputs multirun .pytest_cache site
