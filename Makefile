# The README's two commands: `make serve` and `make test`. Both install what is missing first.
PY ?= python3
PYTEST_ARGS ?=

.PHONY: install test serve lint bench

install:
	@bash scripts/install.sh

test: install
	@.venv/bin/python -m pytest $(PYTEST_ARGS)

serve: install
	@.venv/bin/kernelhub serve $(ARGS)

lint: install
	.venv/bin/ruff check kernelhub tests benchmarks
	.venv/bin/mypy kernelhub

bench: install
	.venv/bin/pip install -q -e '.[bench]'
	.venv/bin/python benchmarks/cold_start.py
	.venv/bin/python benchmarks/pool.py
