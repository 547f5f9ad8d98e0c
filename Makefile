# Two commands get a fresh machine going:  make run  (start the gateway)  and  make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

BROWSER_DIR := tests/browser

.PHONY: run test install install-test install-browser console-screenshot clean

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

# The console's browser test: Debian's Chromium (apt, as root) and playwright-core (npm) to
# drive it; Playwright's own browser download is never used. CI runs this before the tests.
install-browser: $(BROWSER_DIR)/node_modules/.installed
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

$(BROWSER_DIR)/node_modules/.installed: $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	cd $(BROWSER_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# docs/console.png, the README's screenshot, taken by the browser test.
console-screenshot: install-test install-browser
	WS_GATEWAY_CONSOLE_SCREENSHOT=$(CURDIR)/docs/console.png $(PY) -m pytest -q tests/test_console.py -k browser

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis $(BROWSER_DIR)/node_modules
