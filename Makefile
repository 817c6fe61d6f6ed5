# rmmhunt: every target bootstraps what it needs. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_STAMP := $(VENV)/.debs
# Debian packages: osslsigncode + wixl (msitools) build the signed fixtures (make fixtures);
# the tests and the scan need none beyond the base system (libcrypto for oscrypto).
DEB_PACKAGES := openssl osslsigncode wixl
SCAN_ARGS ?=

.PHONY: install debs scan test lint fixtures bench catalog catalog-report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $@
	@echo "installed: $(BIN)/rmmhunt"

# Install the Debian packages only when a tool is missing (CI and fresh machines run as root).
$(DEB_STAMP):
	@mkdir -p $(VENV)
	@missing=""; \
	for t in openssl osslsigncode wixl; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi
	@touch $@

debs: $(DEB_STAMP)

# The main job: scan this machine's default roots into the embedded SQLite store and print the report.
scan: install
	$(BIN)/rmmhunt scan $(SCAN_ARGS); rc=$$?; [ $$rc -le 1 ] || exit $$rc

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check agent tests bench
	$(BIN)/mypy

fixtures: install debs
	$(BIN)/python tests/fixtures/generate.py

bench: install
	$(BIN)/python bench/run.py

# Rebuild config/rules/rmmhunt_*.yaml and config/rule_attribution.yaml from config/catalog_curated.yaml
# and the LOLRMM reference data (../shared/reference or $$RMMHUNT_REFERENCE_DIR); deterministic.
catalog: install
	$(BIN)/python -m agent.catalog.generate

catalog-report: install
	$(BIN)/python -m agent.catalog.report

clean:
	rm -rf $(VENV) build/dist build/work
