# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test sanitize deep lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch; an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# Every extra the tests import (TRL is a peer the packing tests compare with), at the versions we tested.
	$(PY) -m pip install -q -c constraints.txt -e ".[hf,datasets,viz,dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnmask demo

# pytest exits 5 when it collects no test: make treats every non-zero exit as failure. Then the C kernel's tests again
# under the sanitizers (below).
test: $(STAMP)
	ATTNMASK_STRICT_DEPS=1 $(PY) -m pytest -q -n 2 tests
	$(MAKE) --no-print-directory sanitize

# The native backend's C kernel built with AddressSanitizer and UndefinedBehaviorSanitizer (any finding fails), under
# its tests, the conformance cases, and planning's allowed-pair counts, packed and padded rows' segments and the
# estimates' sums over segments (blocksparse's tiles, native's items and deal, varlen's floor, the most keys a query
# sees), which run in the same library (--capture=sys: a sanitizer's report, written by C to fd 2, is shown); one line
# and success where the compiler has no sanitizers.
# `make test` ends with it.
CC ?= cc
sanitize: $(STAMP)
	@if ! echo 'int main(void) { return 0; }' | $(CC) -x c -fsanitize=address,undefined -o /dev/null - 2>/dev/null; then \
		echo "sanitize: $(CC) cannot build with -fsanitize=address,undefined; skipped"; exit 0; fi; \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 ATTNMASK_NATIVE_SANITIZE=1 ATTNMASK_STRICT_DEPS=1 \
	ATTNMASK_CACHE_DIR="$$(mktemp -d)" LD_PRELOAD="$$($(CC) -print-file-name=libasan.so)" \
	$(PY) -m pytest -q -p no:cacheprovider --capture=sys tests/test_native.py tests/test_conformance.py \
		tests/test_small_rows.py tests/test_floors.py -k "native or allowed_fraction or packed_rows or padded_rows or in_c_as_numpy"

# The property tests of attention (backends against the reference, non-finite inputs, the native kernel, masks) with
# four times their examples from random seeds, on both cores: tens of minutes, not part of `make test`.
deep: $(STAMP)
	ATTNMASK_DEEP=4 ATTNMASK_STRICT_DEPS=1 $(PY) -m pytest -q -n 2 -p no:cacheprovider tests/test_conformance.py \
		tests/test_native.py tests/test_attention.py tests/test_sparse.py tests/test_per_head.py tests/test_fuzz.py \
		tests/test_masks.py tests/test_lowering.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/attnmask bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
