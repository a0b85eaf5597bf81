#!/usr/bin/env bash
# Installs Debian's headless Chromium for the browser test of `vcut report` (tests/test_report.py):
# it loads DIR/report.html, reads the DOM and the console, and takes a screenshot. Debian/Ubuntu,
# as root or with sudo. Idempotent and quiet: does nothing when a headless Chromium is on PATH.
set -euo pipefail
for name in chromium-headless-shell chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no apt-get here; put 'chromium-headless-shell' or 'chromium' on PATH yourself" >&2
  exit 1
fi
$SUDO apt-get update -qq
# chromium-headless-shell: the headless-only build (no X11 or GTK stack), fonts for the page's text.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  chromium-headless-shell fonts-dejavu-core >/dev/null
command -v chromium-headless-shell
