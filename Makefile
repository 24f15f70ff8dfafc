# The two commands of the quick start:  `make demo`  and  `make test`.
# Needs only python3 (3.11), git and access to the package registries: uv is installed into .tools/ if absent.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
export UV_COMPILE_BYTECODE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup tools demo test test-fast bench lint

.tools/bin/uv:
	python3 -m venv .tools && .tools/bin/pip install -q "uv==0.13.9"

setup: $(UV)
	$(UV) sync --frozen

tools:  ## promtool for tests/infra (Debian's prometheus package; CI machines run as root)
	@command -v promtool >/dev/null || test -x .tools/bin/promtool || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool missing: sudo apt-get install prometheus (tests/infra need it)"; fi; }

demo: setup  ## install, then run the main job on the embedded defaults
	$(UV) run defectops demo $(ARGS)

test: setup tools  ## install, then run the whole test suite
	$(UV) run pytest $(PYTEST_ARGS)

test-fast: setup tools  ## everything but the slow tests
	$(UV) run pytest -m "not slow" $(PYTEST_ARGS)

bench: setup  ## measured figures (see benchmarks/)
	$(UV) run python benchmarks/manifest_throughput.py

lint: setup
	$(UV) run ruff check components flows tests benchmarks
