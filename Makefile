# Two commands from a fresh clone: `make demo` (the main job) and `make test` (lint + the test suite).
# Both create and use the local virtual environment .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: torch 2.13.0 installs a CPU build in seconds. On a CUDA machine: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= edge,cloud,train,dev
STAMP := $(VENV)/.installed-$(shell echo "$(EXTRAS)" | tr ',' '-')

.PHONY: setup demo test lint clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	@# Debian's docker-compose validates docker-compose.yml in the tests, and haproxy and nginx run the shipped
	@# balancer configurations (tests/cloud/test_balancers.py); installed when root and missing
	missing=""; for t in docker-compose haproxy nginx; do command -v $$t >/dev/null || test -x /usr/sbin/$$t || \
		missing="$$missing $$t"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || true; fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/coexit demo

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
