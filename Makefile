# Two commands get a fresh machine going:  make run  (start the gateway)  and  make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

BROWSER_DIR := tests/browser

.PHONY: run test install install-test install-test-tools console-screenshot clean

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

# Programs the end-to-end tests drive, from Debian's and npm's registries: Chromium (apt,
# as root) with playwright-core (npm) for the console, never Playwright's own browser
# download; nginx, unpacked from its .deb under tests/.tools (never installed as a
# service) for the proxy site; and systemd's systemd-analyze and systemd-sysusers, which
# rate the unit and create its user offline (nothing is started). CI runs this before the tests.
TOOLS_DIR := tests/.tools
NGINX := $(TOOLS_DIR)/nginx/usr/sbin/nginx

install-test-tools: $(BROWSER_DIR)/node_modules/.installed $(NGINX)
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	@command -v systemd-analyze >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd; }

$(BROWSER_DIR)/node_modules/.installed: $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	cd $(BROWSER_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(NGINX):
	rm -rf $(TOOLS_DIR)/nginx && mkdir -p $(TOOLS_DIR)/nginx
	cd $(TOOLS_DIR)/nginx && { apt-get download nginx 2>/dev/null || { apt-get update -q && apt-get download nginx; }; } \
	    && dpkg-deb -x nginx_*.deb . && rm nginx_*.deb
	$(NGINX) -v

# docs/console.png, docs/console-operator.png and docs/console-resume.png, the console's screenshots
# in docs/operations.md, taken by the browser tests.
console-screenshot: install-test install-test-tools
	WS_GATEWAY_CONSOLE_SCREENSHOT=$(CURDIR)/docs/console.png $(PY) -m pytest -q tests/test_console.py -k browser

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis $(BROWSER_DIR)/node_modules $(TOOLS_DIR)
