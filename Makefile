# The two jobs of the README: `make serve` and `make test`. Each sets up what it needs first
# (a virtual environment in .venv, re-installed only when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: serve test setup setup-test browser pipewire cam

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# The test extra on top (pytest, and Triton for its CPU interpreter: a large download that
# serving on the CPU does not need).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The virtual camera's extra (pyvirtualcam) for `make cam`.
$(VENV)/.installed-cam: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[cam]'
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

# Debian's Chromium and Firefox ESR, for the end-to-end browser tests (installed when missing
# and we are root; otherwise those tests are skipped with the reason).
browser:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="chromium"; \
	command -v firefox-esr >/dev/null 2>&1 || command -v firefox >/dev/null 2>&1 || missing="$$missing firefox-esr"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: $$missing not installed; the browser tests will be skipped"; fi; fi

# Debian's PipeWire daemon, its session manager, a session bus and GStreamer's PipeWire elements,
# for the end-to-end test of `xportrait cam`'s PipeWire camera source, and Xvfb for its preview
# window's (installed when missing and we are root; otherwise those tests are skipped with the
# reason). The tests start their own daemon and X server.
PIPEWIRE_PACKAGES := pipewire pipewire-bin wireplumber dbus-daemon gstreamer1.0-tools gstreamer1.0-pipewire \
	gstreamer1.0-plugins-base xvfb
pipewire:
	@if ! command -v pipewire >/dev/null 2>&1 || ! command -v wireplumber >/dev/null 2>&1 || \
	  ! command -v dbus-daemon >/dev/null 2>&1 || ! command -v gst-launch-1.0 >/dev/null 2>&1 || \
	  ! gst-inspect-1.0 pipewiresink >/dev/null 2>&1 || ! command -v Xvfb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      $(PIPEWIRE_PACKAGES) >/dev/null; \
	  else echo "note: PipeWire/GStreamer not installed; the PipeWire test of xportrait cam will be skipped"; fi; fi

serve: setup
	$(BIN)/xportrait serve --host $(HOST) --port $(PORT)

# The webcam, animated, as the "xportrait" camera: make cam CAM_ARGS="--server http://gpu-box:8080 --token SECRET"
cam: $(VENV)/.installed-cam
	$(BIN)/xportrait cam $(CAM_ARGS)

# Two passes: the tests not marked realtime on two processes (pytest-xdist), then the realtime
# ones (rates and timeouts measured against the wall clock: pyproject.toml's markers) on one,
# with the machine to themselves. On the 2-core machine (a fresh clone): 5:00-5:30, then
# 5:25-5:55, where one process took 14:43 for the whole suite.
test: setup-test browser pipewire
	$(BIN)/python -m pytest -q -n 2 -m "not realtime"
	$(BIN)/python -m pytest -q -m realtime
