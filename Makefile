# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
VENV ?= .venv
PYTHON ?= python3
# The CPU build that lies on disk on our machines; any torch>=2.4 works (make TORCH=torch).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WEB_STAMP := web/node_modules/.installed-stamp

.PHONY: setup demo test system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Test tools from Debian: Chromium for the browser tests (never a downloaded browser build), and
# docker-compose 1.x for `docker-compose config` and the Compose schema it ships (no engine needed).
system-deps:
	@command -v chromium >/dev/null && command -v docker-compose >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium docker-compose >/dev/null)

setup: $(STAMP) $(WEB_STAMP)

demo: setup
	$(VENV)/bin/avgctl demo

test: setup system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest
