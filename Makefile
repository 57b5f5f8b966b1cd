# The two commands a new user needs: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on disk here; pip finds it through --find-links.
WHEELS ?= $(wildcard /opt/wheels)
PIP_FLAGS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: install demo test test-fast bench bench-learning bench-replay bench-crash check-config clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml daemon/deciding/_rls.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e '.[dev,demo,report,fleet]'
	touch $@

demo: install
	$(VENV)/bin/reflexd demo

test: install
	$(PY) -m pytest -q -n auto

test-fast: install
	$(PY) -m pytest -q -n auto -m "not e2e and not slow"

bench: install
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e '.[bench]'
	$(PY) -m bench.perf

bench-learning: install
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e '.[bench]'
	$(PY) -m bench.learning

# e.g. make bench-replay ARGS="--streams wine --seeds 12 --set gate.margin=0.05"
bench-replay: install
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e '.[bench]'
	$(PY) -m bench.replay $(ARGS)

bench-crash: install
	$(PY) -m pytest -q -s tests/e2e/test_crash.py --crash-cycles=200

check-config: install
	$(VENV)/bin/reflexd check-config configs/reflexd.yaml

# Install as a systemd service (docs/operations.md): a venv of its own under PREFIX with reflexd
# and the CPU build of torch, the units, sysusers and tmpfiles snippets, and
# /etc/reflexd/reflexd.yaml (an existing one is kept). Needs only python3 with its venv module
# (python3-venv on Debian and Ubuntu), not .venv. DESTDIR stages it all under another root.
# torch comes from TORCH_INDEX (the CPU-only builds) unless a local wheel directory is used;
# INSTALL_ARGS adds options (python3 daemon/tools/install.py --help).
PREFIX ?= /opt/reflexd
DESTDIR ?=
TORCH_INDEX ?= $(if $(WHEELS),,https://download.pytorch.org/whl/cpu)
.PHONY: install-service
install-service:
	$(PYTHON) daemon/tools/install.py --prefix '$(PREFIX)' --destdir '$(DESTDIR)' --torch-index '$(TORCH_INDEX)' \
		$(if $(WHEELS),--find-links '$(WHEELS)',) $(INSTALL_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache build daemon/deciding/_rls*.so
