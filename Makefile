# fedsmm: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The exact, tested set of versions; pyproject.toml declares ranges.
CONSTRAINTS := requirements/constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install test test-all bench demo clean help

help:
	@echo "make install   create $(VENV) and install fedsmm with its test extras"
	@echo "make test      install if needed, run the default test tier (unit + quick training)"
	@echo "make test-all  also the slow tiers"
	@echo "make bench     quick benchmarks (results under benchmarks/results/)"
	@echo "make demo      not yet available: arrives with the evaluation report (see README)"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not deployment" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/model_speed.py --quick

demo:
	@echo "make demo is not available yet: it arrives with the evaluation report." >&2
	@echo "Until then: see the README (smm synth, smm simulate configs/demo.yaml)." >&2
	@exit 2

clean:
	rm -rf $(VENV) .pytest_cache
