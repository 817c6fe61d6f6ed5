# rmmhunt: every target bootstraps what it needs. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_STAMP := $(VENV)/.debs
# Debian packages: osslsigncode + wixl (msitools) build the signed fixtures (make fixtures);
# the scan needs none beyond the base system (libcrypto for oscrypto); the tests also need
# postgresql and chromium (test-debs below).
DEB_PACKAGES := openssl osslsigncode wixl mingw-w64
SCAN_ARGS ?=

.PHONY: install debs test-debs scan test lint fixtures bench fuzz catalog catalog-report build clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench,build]'
	@touch $@
	@echo "installed: $(BIN)/rmmhunt"

# Install the Debian packages only when a tool is missing (CI and fresh machines run as root).
$(DEB_STAMP):
	@mkdir -p $(VENV)
	@missing=""; \
	for t in openssl osslsigncode wixl x86_64-w64-mingw32-windres; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi
	@touch $@

debs: $(DEB_STAMP)

# Debian packages the tests use, installed here only when missing: a real PostgreSQL and a headless
# Chromium (collector, dashboard, sweep report), ntfs-3g, qemu-utils and ewf-tools (generated disk
# images for the sweep tests) and systemd (systemd-analyze verify of the unit).
test-debs:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v mkntfs >/dev/null || missing="$$missing ntfs-3g"; \
	command -v qemu-img >/dev/null || missing="$$missing qemu-utils"; \
	command -v ewfacquire >/dev/null || missing="$$missing ewf-tools"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# The main job: scan this machine's default roots into the embedded SQLite store and print the report.
# stdout carries the report only (no recipe echo); the install runs quietly into $(VENV)/install.log,
# shown only if it fails. make itself can only exit 0 or 2: a clean scan exits 0, anything else
# non-zero, and the scan's own code (1 findings, 2 error) is named on stderr.
scan:
	@mkdir -p $(VENV); $(MAKE) --no-print-directory install >$(VENV)/install.log 2>&1 || \
	  { cat $(VENV)/install.log >&2; echo "make scan: install failed (log: $(VENV)/install.log)" >&2; exit 2; }
	@$(BIN)/rmmhunt scan $(SCAN_ARGS); rc=$$?; \
	case $$rc in 0) ;; 1) echo "make scan: rmmhunt exit 1 (findings)" >&2 ;; *) echo "make scan: rmmhunt exit $$rc (error)" >&2 ;; esac; \
	exit $$rc

test: install test-debs
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check agent collector tests bench
	$(BIN)/mypy

fixtures: install debs
	$(BIN)/python tests/fixtures/generate.py

# Speed figures as ratios inside one run: the scan engine and rules (run.py), the endpoint runtime
# (watch latency, idle run, CPU cap, process sweep) and the collector (ingest, fleet hunt).
bench: install test-debs
	$(BIN)/python bench/run.py
	$(BIN)/python bench/runtime_bench.py
	$(BIN)/python bench/collector.py

# Mutation fuzzing of the extractor (not part of make test; a seeded 2,000-case subset is).
N ?= 100000
fuzz: install
	$(BIN)/python tests/fuzz/harness.py --cases $(N)

# The one-file binary dist/rmmhunt from build/rmmhunt.spec (data found through agent/resources.py).
build: install
	$(BIN)/python -m PyInstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/work build/rmmhunt.spec
	@ls -l dist/rmmhunt

# Rebuild config/rules/rmmhunt_*.yaml and config/rule_attribution.yaml from config/catalog_curated.yaml
# and the LOLRMM reference data (../shared/reference or $$RMMHUNT_REFERENCE_DIR); deterministic.
catalog: install
	$(BIN)/python -m agent.catalog.generate

catalog-report: install
	$(BIN)/python -m agent.catalog.report

clean:
	rm -rf $(VENV) build/dist build/work dist
