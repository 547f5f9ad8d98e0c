# Two commands get a fresh machine going:  make run  (start the gateway)  and  make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test install install-test clean

run: install
	bin/ws-gateway -c etc/gateway.ini

test: install-test
	$(PY) -m pytest -q tests

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
