# Two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo lint bench install clean

install: $(STAMP)

# Reinstall when the dependency list changes. pip (not uv/poetry) so the machine's local wheels are seen.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# lint first (a second): CI runs `make test`, so style errors fail it too. Two pytest workers, one test
# file each at a time (module fixtures stay in one process): half the suite's wall time is Ray start-up,
# process launch and waiting, so one worker leaves a core idle (tests/conftest.py: one torch thread each)
test: $(STAMP)
	$(BIN)/ruff check selva selva_cli preprocessing pipelines training tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/selva demo

lint: $(STAMP)
	$(BIN)/ruff check selva selva_cli preprocessing pipelines training tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/model_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
