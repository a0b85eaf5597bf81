#!/usr/bin/env bash
# Installs a Prometheus server and Pushgateway for the metrics integration tests (Debian/Ubuntu, as root or
# with sudo). The test starts and stops the server itself, on loopback only.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v prometheus-pushgateway >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-prometheus: no apt-get here; install a 'prometheus' binary on PATH yourself" >&2
  exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway >/dev/null
# The Debian package starts a system service where systemd runs; the test uses its own.
$SUDO systemctl stop prometheus prometheus-pushgateway >/dev/null 2>&1 || true
command -v prometheus prometheus-pushgateway
