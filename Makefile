# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Everything they install is pinned in constraints.txt (`make pins` refreshes it), so a release
# upstream cannot change what the tests run against; pyproject.toml keeps loose lower bounds.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PINS   := constraints.txt
# Pins apply to build environments too (the wheel the packaging tests build), and to every pip
# the tests start.
export PIP_CONSTRAINT       := $(abspath $(PINS))
export PIP_BUILD_CONSTRAINT := $(abspath $(PINS))

.PHONY: setup demo test bench pins clean

setup: $(STAMP)

# torch is the CPU build (a local file here); a looser torch pulls gigabytes of CUDA packages.
# compileall: bytecode, as pip compiles a regular install; an editable one gets none where
# PYTHONDONTWRITEBYTECODE is set, so every command compiled its modules again (about 0.1 s a merge).
# (_follow.c, _mix.c: the install compiles them in place, so a changed one needs the install again)
$(STAMP): pyproject.toml $(PINS) plugins/merges/_follow.c plugins/merges/_mix.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep '^pip==' $(PINS))"
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q adaptkit plugins
	touch $@

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/inspect_speed.py

UNPINNED := env -u PIP_CONSTRAINT -u PIP_BUILD_CONSTRAINT
# Re-resolve the newest releases that pyproject.toml allows into constraints.txt; then run `make test`.
pins:
	rm -rf .venv-pins
	$(PYTHON) -m venv .venv-pins
	$(UNPINNED) .venv-pins/bin/python -m pip install --quiet --upgrade pip setuptools
	$(UNPINNED) .venv-pins/bin/python -m pip install --quiet torch==2.13.0
	$(UNPINNED) .venv-pins/bin/python -m pip install --quiet '.[dev]'
	{ sed -n '1,2p' $(PINS); .venv-pins/bin/python -m pip freeze --all --exclude adaptkit | sed 's/+[a-z0-9.]*$$//'; } > $(PINS).new
	mv $(PINS).new $(PINS)
	rm -rf .venv-pins build

clean:
	rm -rf $(VENV) build dist *.egg-info plugins/merges/*.so
