# `make test` and `make demo` each set up everything they need on a fresh Debian/Ubuntu machine:
# apt packages (QEMU), a virtual environment in .venv/ with VIMS installed (editable), the guest image
# (built on first use, cached under ~/.cache/vims).
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEM := $(VENV)/.system-packages

.PHONY: test demo lint typecheck pytest setup bench clean notebooks

setup: $(STAMP) $(SYSTEM)

$(SYSTEM): scripts/system-packages.sh scripts/qemu-plugin-setup.sh collector/plugin/vims_syscall.c
	bash scripts/system-packages.sh
	bash scripts/qemu-plugin-setup.sh || { test -z "$$CI" && echo "warning: no QEMU plugin tracer (--tracer plugin) on this host: see the error above" >&2; }
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml $(SYSTEM)
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# import-linter (grimp) walks the `vims` package's own folder only, so it would not see the parts that
# `package-dir` maps from the top-level folders. `lint-imports` therefore reads a copy laid out as the
# installed namespace (build/import-graph/vims/<part>), put first on the path. Contracts: pyproject.toml.
PARTS := collector models training remote datasets avm demo
GRAPH := build/import-graph

lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf $(GRAPH) && mkdir -p $(GRAPH) && cp -r vims $(GRAPH)/vims
	@for p in $(PARTS); do if [ -d $$p ]; then cp -r $$p $(GRAPH)/vims/$$p; fi; done
	cd $(GRAPH) && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml --no-cache

typecheck: $(STAMP)
	bash scripts/typecheck.sh

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

demo: setup
	$(BIN)/vims demo

# Every benchmark prints its numbers against a baseline measured in the same run.
bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info

# The notebooks saved with their outputs (plots and tables visible without running them): 01 and 02 on the
# full data sets; 03 and 04 boot a guest (`flock /tmp/vims-guest.lock .venv/bin/python notebooks/execute.py 03_guest.ipynb`).
notebooks: setup
	.venv/bin/pip install -q -e '.[notebooks]'
	.venv/bin/python notebooks/execute.py
