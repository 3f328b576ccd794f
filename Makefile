# hotpatch: `make demo` runs the main job, `make test` the test suite.
# Both set up everything on a fresh Debian machine (system packages when run
# as root, a virtualenv in .venv, the compiled core, the C fixtures).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FIXTURES := build/fixtures
SYSTEM_PACKAGES := g++ gcc-mingw-w64-x86-64 g++-mingw-w64-x86-64 libz-mingw-w64-dev wine64 chromium chromium-driver
# Debian's own python3 (or none yet) needs these to make the venv and compile the core against Python.h;
# a Python of its own (pyenv, a build in /usr/local) brings both
ifeq ($(filter-out /usr,$(shell $(PYTHON) -c 'import sys; print(sys.base_prefix)' 2>/dev/null)),)
SYSTEM_PACKAGES += python3 python3-dev python3-venv
endif

.PHONY: demo demo-rollout test test-fast bench fuzz fuzz-pe deps venv fixtures realbins train-calendars corpus corpus-live lint clean

demo: venv fixtures
	$(PY) -m hotpatch.cli.demo --fixtures $(FIXTURES) --work build/demo

# a small fleet on a LocalCluster: a canary fails its health probe and is rolled back live
demo-rollout: venv fixtures
	$(PY) -m hotpatch.rollout.demo --fixtures $(FIXTURES) --work build/demo-rollout

test: venv fixtures
	$(PY) -m pytest tests

# the corpus's live runs alone (make test runs them too): apply and roll back each HOTPATCH fix in a running host
corpus-live: venv fixtures
	$(PY) -m pytest tests/test_corpus.py -k switches_live

# the fast layer: no Wine, no downloaded binaries, no browser, nothing slow
test-fast: venv fixtures
	$(PY) -m pytest tests -m "not wine and not realbins and not slow and not browser and not corpus and not cluster" -q

bench: venv fixtures
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,mean,rounds

# deeper mutation runs than the test suite's: both package readers (tests/fuzz_package.py),
# the agent's request parser under ASan/UBSan (tests/fuzz_agent.py), and PE input (fuzz-pe)
fuzz: venv fuzz-pe
	$(PY) tests/fuzz_package.py --cases 200000
	$(PY) tests/fuzz_agent.py --cases 1000000

# PE mutants through the CLI, in-process and a sample as subprocesses, under a 4 GiB address-space limit
fuzz-pe: venv fixtures
	$(PY) tests/fuzz_pe.py --cases 30000 --subprocess-sample 50

lint: venv
	$(VENV)/bin/ruff check hotpatch tests benchmarks setup.py

deps:
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml setup.py $(wildcard hotpatch/*.pyx hotpatch/*/*.pyx hotpatch/*/*.pxd hotpatch/analysis/includes/*.pxd native/*.c native/*.h native/agent/*.c native/agent/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

fixtures: deps venv
	$(PY) tests/fixtures/build_fixtures.py --out $(FIXTURES)
	$(PY) tests/fixtures/build_product.py --out $(FIXTURES)

realbins: venv
	$(PY) tests/support/realbins.py

# the release trains of the fixture product, numpy and cryptography; their calendars are redrawn into docs/
train-calendars: venv fixtures
	$(VENV)/bin/hotpatch train $(FIXTURES)/product.toml -o build/trains/product > /dev/null
	cp build/trains/product/calendar.svg docs/train-product.svg
	$(PY) tests/support/realtrains.py --out build/trains --docs docs

# the real-fix corpus (Debian sources, needs root once to add a deb-src entry): build, run, write the table
corpus: venv
	$(PY) -m tests.corpus.measure --doc docs/CORPUS.md

clean:
	rm -rf build dist $(VENV) hotpatch/bin/hotpatch-agent.exe* *.egg-info
	find hotpatch -name '*.so' -delete
	# the C (C++ for the ownership scan) that Cython generates next to each .pyx
	for pyx in $(wildcard hotpatch/*/*.pyx); do rm -f "$${pyx%.pyx}.c" "$${pyx%.pyx}.cpp"; done
