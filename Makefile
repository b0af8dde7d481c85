# The README's two commands: `make bench` (the main job) and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= bench_out
# The GPU image's Triton (beside its torch 2.11). Code generation differs between releases, so
# `make test` compiles every kernel for sm_90 with it as well as with the venv's own Triton.
ALT_TRITON_VERSION := 3.6.0
ALT_TRITON := .triton-$(ALT_TRITON_VERSION)

.PHONY: install test lint bench gpu-check gpu-tune clean

# --system-site-packages reuses an existing (CUDA) torch; editable install with test + bench extras.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

$(ALT_TRITON)/.stamp: | $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(ALT_TRITON) triton==$(ALT_TRITON_VERSION)
	touch $@

test: lint $(ALT_TRITON)/.stamp
	ZETA_FUSED_ALT_TRITON=$(CURDIR)/$(ALT_TRITON) $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench --out $(OUT)

# For a CUDA machine with torch + triton preinstalled and no network: no venv, no dependencies.
# Runs the whole suite natively on the GPU (gpu-marked tests included), then the quick benchmark
# even when a test failed; logs (tests, per-kernel registers/spills for sm_90, benchmark), JSON,
# Markdown and the chart go to $(OUT) (the device tool sets OUT). Exits non-zero if a step failed.
# Each kernel variant compiles on first use (about 230 in the suite): with pytest-xdist, as on
# the GPU image, eight workers compile them in parallel.
gpu-check: XDIST := $(shell python3 -c 'import xdist' 2>/dev/null && printf -- '-n 8')
gpu-check:
	python3 -m pip install -q -e . --no-deps --no-build-isolation
	mkdir -p $(OUT)
	set -o pipefail; status=0; \
	python3 -m pytest -q -rs $(XDIST) tests 2>&1 | tee $(OUT)/gpu-tests.log || status=1; \
	env -u TRITON_INTERPRET python3 tests/aot_compile.py > $(OUT)/aot-sm90.log 2>&1 || status=1; \
	python3 -m bench --preset quick --out $(OUT) 2>&1 | tee $(OUT)/bench.log || status=1; \
	exit $$status

# Block-size tuning on a CUDA machine (no venv, as gpu-check): the fused op under each variant
# of bench/tune.py; the table, tune.json and the log go to $(OUT).
gpu-tune:
	python3 -m pip install -q -e . --no-deps --no-build-isolation
	mkdir -p $(OUT)
	set -o pipefail; python3 -m bench.tune --out $(OUT) 2>&1 | tee $(OUT)/tune.log

clean:
	rm -rf $(VENV) $(ALT_TRITON) $(OUT) .pytest_cache .ruff_cache *.egg-info
