# Two commands do all the set-up on a fresh machine:
#   make demo   # creates/refreshes .venv, runs the built-in demo (configs/demo.py)
#   make test   # creates/refreshes .venv, runs the test suite
# ACCEL picks the jax build: cpu (default, the pinned CPU jaxlib of requirements.lock), cuda12
# (NVIDIA GPUs: jax[cuda12], CUDA 12 wheels from PyPI) or tpu (Cloud TPU VMs: jax[tpu]), e.g.
#   make demo ACCEL=cuda12
# The choice is remembered in .venv/.accel (later `make test` keeps it); switching ACCEL on an
# existing .venv changes only the jax plugins.
VENV ?= .venv
PYTHON ?= python3
ACCEL ?= $(or $(shell cat $(VENV)/.accel 2>/dev/null),cpu)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
ACCELS := cpu cuda12 tpu
# jax's own extras at the jax version the lock pins, so the plugins match jaxlib exactly.
JAX_VERSION := $(shell sed -n 's/^jax==//p' requirements.lock)

ifeq ($(filter $(ACCEL),$(ACCELS)),)
$(error ACCEL=$(ACCEL) is not one of: $(ACCELS))
endif
ifneq ($(words $(ACCEL)),1)
$(error ACCEL must be one word, one of: $(ACCELS))
endif

.PHONY: venv demo test clean
venv: $(VENV)/.installed-$(ACCEL)

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

# The accelerator layer on top of the CPU install: jax[<ACCEL>]==<the locked jax> (jaxlib stays
# the locked one; the plugins come with it). cpu removes plugins a previous ACCEL installed.
$(VENV)/.installed-$(ACCEL): $(VENV)/.installed
ifeq ($(ACCEL),cpu)
	$(PY) -m pip uninstall -q -y jax-cuda12-plugin jax-cuda12-pjrt libtpu 2>/dev/null || true
else
	$(PY) -m pip install -q "jax[$(ACCEL)]==$(JAX_VERSION)"
endif
	rm -f $(VENV)/.installed-*
	echo $(ACCEL) > $(VENV)/.accel
	touch $@

# The test suite also checks Hugging Face parity against transformers' PyTorch models and PEFT:
# torch (CPU) and peft (the `hf` extra) and the notebook runner, pinned in requirements-test.lock.
$(VENV)/.installed-test: $(VENV)/.installed-$(ACCEL) requirements-test.lock
	$(PY) -m pip install -q -r requirements-test.lock
	touch $@

demo: venv
	$(PY) -m jbat.train --config configs/demo.py

# pytest exits 5 when it collected no test: that fails here like any other error.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
