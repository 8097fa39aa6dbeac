# Quick start: `make demo` runs the demo end to end, `make test` runs the suite.
# Both create .venv on first use and install the pinned set from constraints.txt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch first: pip's build of deepspeed imports it, and the pinned CUDA build runs on CPU too.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test unit lint format bench-pack clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The demo: synthetic scene-bias shards (made on first use) -> local Ray
# cluster -> DCLR pretraining (dclr_dist/configs/demo.yaml) -> evaluation on unseen scenes.
demo: $(STAMP)
	$(BIN)/python -m dclr_dist.demo

# Lint and format check first (seconds), then the whole suite: tests/unit (seconds, no Ray, no S3
# server) and tests/integration (real Ray clusters, moto S3, subprocesses; 11-16 minutes on 2 idle cores, as the README says).
# tests/run.py is `python -m pytest`, whose exit code is pytest's verdict (its docstring says why).
test: lint
	$(BIN)/python -X faulthandler -m tests.run -q

# The inner loop: the unit tests only.
unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-pack: $(STAMP)
	$(BIN)/python benchmarks/pack.py

clean-demo:
	rm -rf shards/demo runs/demo
