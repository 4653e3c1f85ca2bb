# Two commands do all the set-up on a fresh machine:
#   make demo   # creates/refreshes .venv, runs the built-in demo (configs/demo.py)
#   make test   # creates/refreshes .venv, runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test clean
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	touch $@

# The test suite also checks Hugging Face parity against transformers' PyTorch models and PEFT:
# torch (CPU) and peft (the `hf` extra) and the notebook runner, pinned in requirements-test.lock.
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.lock
	$(PY) -m pip install -q -r requirements-test.lock
	touch $@

demo: venv
	$(PY) -m jbat.train --config configs/demo.py

# pytest exits 5 when it collected no test: that fails here like any other error.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
