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

.PHONY: install test lint bench aot-matrix gpu-perf gpu-check gpu-tune gpu-first-call gpu-profile gpu-sanitize clean

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

# The full compile matrix, no GPU needed: every kernel variant for every architecture of
# zeta_fused/op/devices.py (sm_80, sm_86, sm_89, sm_90, sm_100, sm_120, gfx942) under its own
# launch policy, each variant's shared memory checked against that architecture's per-block
# limit, with the venv's Triton and the GPU image's side by side (14 minutes on 2 cores from an
# empty Triton cache).
# Logs and per-variant JSON go to $(OUT)/aot-matrix-<triton>.{txt,json}; `make test` compiles
# sm_90 with both (every variant with the GPU image's release) and a subset of the others.
AOT_RUN = env -u TRITON_INTERPRET $(PY) tests/aot_compile.py --target all
aot-matrix: $(STAMP) $(ALT_TRITON)/.stamp
	mkdir -p $(OUT)
	$(AOT_RUN) --json $(OUT)/aot-matrix-venv.json > $(OUT)/aot-matrix-venv.txt 2>&1 & venv=$$!; \
	PYTHONPATH=$(CURDIR)/$(ALT_TRITON) $(AOT_RUN) --json $(OUT)/aot-matrix-$(ALT_TRITON_VERSION).json \
		> $(OUT)/aot-matrix-$(ALT_TRITON_VERSION).txt 2>&1 & alt=$$!; \
	wait $$venv; venv_rc=$$?; wait $$alt; alt_rc=$$?; \
	grep -h -e "^Triton" -e "kernel variants" -e "^FAIL" $(OUT)/aot-matrix-*.txt; \
	exit $$(( venv_rc || alt_rc ))

# For a CUDA machine with torch + triton preinstalled and no network: no venv, no dependencies.
# Runs the whole suite natively on the GPU (gpu-marked tests included), then the quick benchmark
# and the token-subset presets even when a test failed; logs, JSON, Markdown and the chart go to $(OUT) (the device tool sets
# OUT). Exits non-zero if a step failed. Time caps keep one call inside the device tool's
# 10-minute command limit: the suite gets at most GPU_TESTS_S, the benchmark the rest of
# GPU_CHECK_S; it rewrites bench.json after every cell, so a capped run keeps what it measured.
# Each kernel variant compiles on first use (about 230 in the suite): with pytest-xdist, as on
# the GPU image, eight workers compile them in parallel; with pytest-timeout, a hung test fails
# alone.
GPU_CHECK_S ?= 560
# Test peers the GPU image lacks, carried as wheels: the device tool's `carry` brings this
# git-ignored folder (pip download --no-deps --only-binary=:all: --python-version 3.12
# NAME==VERSION -d .whl): vit-pytorch, open-clip-torch + ftfy + wcwidth, diffusers +
# importlib_metadata, segment-anything (the image's torchvision serves it). Without them those
# tests and presets are skipped.
WHEELS ?= .whl
WHEEL_SITE ?= /tmp/zeta-fused-site
PEER_WHEELS = if ls $(WHEELS)/*.whl >/dev/null 2>&1; then \
		python3 -m pip install -q --no-index --no-deps --target $(WHEEL_SITE) $(WHEELS)/*.whl \
		&& export PYTHONPATH=$(WHEEL_SITE)$${PYTHONPATH:+:$$PYTHONPATH}; fi
GPU_TESTS_S ?= 300
gpu-check: XDIST := $(shell python3 -c 'import xdist' 2>/dev/null && printf -- '-n 8')
gpu-check: PER_TEST := $(shell python3 -c 'import pytest_timeout' 2>/dev/null && printf -- '--timeout=200')
gpu-check:
	python3 -m pip install -q -e . --no-deps --no-build-isolation
	mkdir -p $(OUT)
	set -o pipefail; status=0; start=$$(date +%s); export PYTHONUNBUFFERED=1; \
	$(PEER_WHEELS); \
	timeout $(GPU_TESTS_S) python3 -m pytest -q -rs $(XDIST) $(PER_TEST) tests 2>&1 \
		| tee $(OUT)/gpu-tests.log \
		|| { echo "tests: exit $$? (124: the $(GPU_TESTS_S) s cap)" | tee -a $(OUT)/gpu-tests.log; status=1; }; \
	left=$$(( $(GPU_CHECK_S) - $$(date +%s) + start )); \
	timeout $$left python3 -m bench --preset quick --preset subset --out $(OUT) 2>&1 \
		| tee $(OUT)/bench.log \
		|| { echo "bench: exit $$? (124: the remaining $$left s)" | tee -a $(OUT)/bench.log; status=1; }; \
	exit $$status

# The speed questions, the first call on a lent GPU (no venv, as gpu-check; carry $(WHEELS) for
# its peers): python -m bench.perf, in order the GPU's own ceilings (copy bandwidth, cuBLAS on
# the presets' GEMM shapes), every forward preset (the fused default, the launch-policy
# variants of bench/perf.py's VARIANTS, the peers), the training presets, the host probe
# (microseconds and launches per call), the token-subset presets, then the torch.compile peers.
# perf.json and perf.md go to $(OUT), rewritten after every cell, with the goal verdicts.
# Cells start within GPU_PERF_S less GPU_PERF_MARGIN_S (each section within its share,
# bench/perf.py's SHARES), so the last one can finish; the run is killed at GPU_PERF_S: about
# six minutes with the install.
GPU_PERF_S ?= 330
GPU_PERF_MARGIN_S ?= 40
gpu-perf:
	python3 -m pip install -q -e . --no-deps --no-build-isolation
	mkdir -p $(OUT)
	set -o pipefail; export PYTHONUNBUFFERED=1; \
	$(PEER_WHEELS); \
	timeout $(GPU_PERF_S) python3 -m bench.perf --out $(OUT) \
		--budget-s $$(( $(GPU_PERF_S) - $(GPU_PERF_MARGIN_S) )) 2>&1 | tee $(OUT)/perf.log

# Block-size tuning on a CUDA machine (no venv, as gpu-check): the fused op under each variant
# of bench/tune.py (TUNE="--variant NAME ..." picks some); the table, tune.json and the log go
# to $(OUT). Capped like gpu-check; tune.json is rewritten after every cell.
GPU_TUNE_S ?= 540
gpu-tune:
	python3 -m pip install -q -e . --no-deps --no-build-isolation
	mkdir -p $(OUT)
	set -o pipefail; export PYTHONUNBUFFERED=1; \
	timeout $(GPU_TUNE_S) python3 -m bench.tune --out $(OUT) $(TUNE) 2>&1 | tee $(OUT)/tune.log

# First-call cost on a CUDA machine (no venv, as gpu-check): python -m bench.first_call, each
# (preset, mode) cell in a fresh process with an empty Triton cache (first call, each variant's
# JIT compile time, a warm call), for at most a third of GPU_FIRST_CALL_S; then the same with
# tuning on, which fills the tuning table: $(OUT)/tuning holds the file a later run on the same
# GPU, driver, torch and Triton reads. first_call.json is rewritten after every cell.
GPU_FIRST_CALL_S ?= 540
gpu-first-call:
	python3 -m pip install -q -e . --no-deps --no-build-isolation
	mkdir -p $(OUT)
	set -o pipefail; export PYTHONUNBUFFERED=1; start=$$(date +%s); \
	timeout $$(( $(GPU_FIRST_CALL_S) / 3 )) python3 -m bench.first_call --out $(OUT) 2>&1 \
		| tee $(OUT)/first_call.log; \
	left=$$(( $(GPU_FIRST_CALL_S) - $$(date +%s) + start )); \
	ZETA_FUSED_TUNING=1 ZETA_FUSED_CACHE_DIR=$(OUT)/tuning timeout $$left \
		python3 -m bench.first_call --out $(OUT)/tuned 2>&1 | tee $(OUT)/first_call_tuned.log

# Where the host time of fused calls goes, on a CUDA machine (no venv, as gpu-check): python -m
# bench.host_profile (cProfile and torch.profiler of the batch-1 forward and a small training
# step); $(OUT)/host_profile.txt. About half a minute.
gpu-profile:
	python3 -m pip install -q -e . --no-deps --no-build-isolation
	mkdir -p $(OUT)
	set -o pipefail; export PYTHONUNBUFFERED=1; \
	timeout 120 python3 -m bench.host_profile --out $(OUT) 2>&1 | tail -4

# Out-of-bounds and race checks of the fused kernels on a GPU, with compute-sanitizer (it works
# on Firecracker machines, not on gVisor ones): torch's caching allocator is off so that every
# tensor is its own allocation, and the tests are small ones with ragged tiles.
# Seconds per tool: both fit one 10-minute call.
GPU_SANITIZE_S ?= 270
SANITIZE_TESTS ?= tests/op/test_backward.py -k "reads_past or flag_variants or many_token_tiles"
gpu-sanitize:
	python3 -m pip install -q -e . --no-deps --no-build-isolation
	mkdir -p $(OUT)
	set -o pipefail; export PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1; \
	for tool in memcheck racecheck; do \
		timeout $(GPU_SANITIZE_S) compute-sanitizer --tool $$tool --error-exitcode 1 \
			python3 -m pytest -q -x -p no:cacheprovider $(SANITIZE_TESTS) 2>&1 \
			| tee $(OUT)/sanitize-$$tool.log || exit 1; \
	done

clean:
	rm -rf $(VENV) $(ALT_TRITON) $(OUT) .pytest_cache .ruff_cache *.egg-info
