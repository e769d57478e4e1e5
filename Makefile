# The README's commands. `make demo` and `make test` do all the set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
BENCH_METHODS ?= pm,attention,rollout

.PHONY: install data browser test test-all test-lower wheel-check demo docs lint bench clean

install: $(STAMP) data browser

# pyproject.toml declares version ranges; constraints.txt pins the exact ones installed here.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist when possible; vitlens falls back to
# $$VITLENS_DATA, its cache, or torchvision's download otherwise.
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: dataset-fashion-mnist not installable; vitlens will try \$$VITLENS_DATA or a download"; \
	else echo "note: no $(FMNIST); vitlens will try \$$VITLENS_DATA or a download"; fi

# Headless Chromium for the report's browser test (tests/test_report.py); best effort: the test skips
# without it and the build never fails on it.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "note: chromium not installable; the report's browser test will be skipped"; \
	else echo "note: no chromium; the report's browser test will be skipped"; fi

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

# The fast tests on the lowest versions pyproject.toml admits (constraints-lower.txt), in a venv outside
# the checkout; vitlens itself is installed without dependencies so that nothing moves the pins. Not in CI
# (it downloads an old torch); the last result is recorded in benchmarks/lower-bounds.md.
LOWER_VENV ?= ../venv-lower
test-lower:
	python3 -m venv $(LOWER_VENV)
	$(LOWER_VENV)/bin/pip install -q -r constraints-lower.txt
	$(LOWER_VENV)/bin/pip install -q --no-deps -e .
	OMP_NUM_THREADS=1 $(LOWER_VENV)/bin/python -m pytest -q -p no:cacheprovider -rfEs --continue-on-collection-errors

# Build the wheel, install it into a fresh venv outside the checkout that already has torch (pip must
# install nothing else), and run demo, explain and evaluate on the shipped models from another folder.
wheel-check: install
	.ci/wheel-check $(VENV)

# The documentation site (mkdocs.yml, docs/): API reference from the docstrings; warnings are errors.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

demo: install
	$(VENV)/bin/vitlens demo --out demo-out

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: install
	$(VENV)/bin/vitlens bench --methods $(BENCH_METHODS)

clean:
	rm -rf $(VENV) demo-out vitlens-out site .pytest_cache
