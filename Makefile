# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CACHE ?= $(CURDIR)/.cache/neuqi
export NEUQI_CACHE := $(CACHE)
STAMP := $(VENV)/.installed

.PHONY: venv test demo data lint clean bench-peers bench-gguf llama-cpp

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch 2.13.0 with CUDA from PyPI"; \
		$(PIP) install -q --no-cache-dir "torch==2.13.0"; \
	else \
		echo "no NVIDIA GPU: installing the CPU wheel of torch 2.13.0"; \
		$(PIP) install -q "torch==2.13.0"; \
	fi
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

data: $(STAMP)
	$(PY) -m neuqi.data.fetch

# llama.cpp's CPU tools (llama-quantize, -perplexity, -imatrix, -tokenize), built once
# from the llama-cpp-python sdist into the cache: the GGUF tests run our files in them.
LLAMA_CPP_STAMP := $(CACHE)/llama.cpp/0.3.36/build/.complete
$(LLAMA_CPP_STAMP): | $(STAMP)
	$(PY) -m neuqi.engines.llamacpp build

llama-cpp: $(LLAMA_CPP_STAMP)

test: $(STAMP) data $(LLAMA_CPP_STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q --durations=25

# the demo fetches only what it uses (model, c4-sample, wiki-sample), not the whole `data`
demo: $(STAMP)
	$(PY) -m neuqi.data.fetch --only model,c4-sample,wiki-sample
	$(PY) -m neuqi.cli demo

# Our methods vs llm-compressor, GPTQModel, AutoRound and HQQ, each in its own
# venv under .venv-peers/ (pinned in bench/peers.py); ARGS passes options through.
bench-peers: $(STAMP) data
	$(PY) bench/peers.py $(ARGS)

# neuqi's GGUF files vs llama-quantize (with and without imatrix), measured by llama.cpp.
bench-gguf: $(STAMP) data $(LLAMA_CPP_STAMP)
	$(PY) bench/gguf_vs_llamacpp.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info
