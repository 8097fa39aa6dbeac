# Quick start: `make demo` runs the embedded default end to end, `make test` runs the suite.
# Both create .venv on first use and install the pinned set from constraints.txt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch first: pip's build of deepspeed imports it, and the pinned CUDA build runs on CPU too.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench-pack clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The embedded default: synthetic scene-bias shards (made on first use) -> local Ray
# cluster -> DCLR pretraining (dclr_dist/configs/demo.yaml).
demo: $(STAMP)
	$(BIN)/python -m dclr_dist.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-pack: $(STAMP)
	$(BIN)/python benchmarks/pack.py

clean-demo:
	rm -rf shards/demo runs/demo
