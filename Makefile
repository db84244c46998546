# fedsmm: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The exact, tested set of versions; pyproject.toml declares ranges.
CONSTRAINTS := requirements/constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install test test-all test-docker bench demo clean help

help:
	@echo "make install   create $(VENV) and install fedsmm with its test extras"
	@echo "make test      install if needed, run the default test tier (unit + quick training)"
	@echo "make test-all  also the slow tiers"
	@echo "make test-docker  the docker tier: build the images, compose up, two rounds, tear down"
	@echo "make bench     quick benchmarks (results under benchmarks/results/)"
	@echo "make demo      synthetic 3-site cohort -> features -> simulated federation -> report"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not deployment and not docker" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# docker/README.md: Docker (or root, to start Debian's dockerd) and a CPU-only torch wheel.
test-docker: $(STAMP)
	$(BIN)/python -m pytest -m docker tests/docker -q -s

# Quick versions (about 25 minutes on 2 CPU cores); benchmarks/README.md has the full ones and their times.
bench: $(STAMP)
	$(BIN)/python benchmarks/model_speed.py --quick
	$(BIN)/python benchmarks/scale.py --quick
	$(BIN)/python benchmarks/tcga_quality.py --quick
	$(BIN)/python benchmarks/synthetic_quality.py --quick
	$(BIN)/python benchmarks/federation_overhead.py --quick
	$(BIN)/python benchmarks/report_render.py

# The demo: a synthetic 3-hospital cohort with real slide files -> features (ResNet-50 trunk with
# explicitly random weights: nothing can be downloaded here) -> simulated federation -> report.
# Reruns reuse the cohort and the extracted features (both are deterministic and resumable) and
# write a fresh run folder.
DEMO_SITES ?= sites/demo
DEMO_RUN   ?= runs/demo
# Sizes and overrides (tests/test_demo.py runs the same target at a tiny size).
DEMO_SYNTH ?= --patients-per-site 60 --slide-size 1024 --split 0.6,0.15,0.25
DEMO_SET   ?=
SMM        := FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 $(BIN)/smm

demo: $(STAMP)
	@start=$$(date +%s); \
	echo "[demo 1/5] synthetic cohort: 3 sites ($(DEMO_SYNTH)) with tiled pyramidal TIFF slides -> $(DEMO_SITES)"; \
	if [ -f $(DEMO_SITES)/cohort.json ]; then echo "  (already there: reusing it)"; \
	else $(SMM) synth --out $(DEMO_SITES) --sites 3 $(DEMO_SYNTH) --workers 2 || exit 1; fi; \
	for k in 1 2 3; do \
	  echo "[demo 2/5] site_$$k: patch features with resnet50_trunc (random weights, explicitly)"; \
	  $(SMM) extract $(DEMO_SITES)/site_$$k/slides --out $(DEMO_SITES)/site_$$k --random-weights --workers 1 || exit 1; \
	done; \
	echo "[demo 3/5] site checks"; \
	for k in 1 2 3; do $(SMM) site check $(DEMO_SITES)/site_$$k --config configs/demo.yaml $(DEMO_SET) > /dev/null || exit 1; done; \
	echo "  3 site folders pass smm site check"; \
	rm -rf $(DEMO_RUN); \
	echo "[demo 4/5] simulated federation (configs/demo.yaml) -> $(DEMO_RUN)/federated"; \
	$(SMM) simulate configs/demo.yaml --set data.sites_root=$(DEMO_SITES) $(DEMO_SET) --run-dir $(DEMO_RUN)/federated || exit 1; \
	echo "[demo 4/5] the same data pooled (centralized reference) -> $(DEMO_RUN)/centralized"; \
	$(SMM) centralized configs/demo.yaml --set data.sites_root=$(DEMO_SITES) $(DEMO_SET) --run-dir $(DEMO_RUN)/centralized || exit 1; \
	echo "[demo 5/5] report"; \
	$(SMM) report $(DEMO_RUN)/federated $(DEMO_RUN)/centralized || exit 1; \
	echo "demo finished in $$(( $$(date +%s) - start )) s"; \
	echo "Report: $(abspath $(DEMO_RUN))/federated/report.html"

clean:
	rm -rf $(VENV) .pytest_cache
