#!/usr/bin/env bash
# Install the Debian tools the tests use as real peers and judges, when missing.
# As root it installs them; otherwise it says what to run, and the tests that need
# a missing tool skip with that command as the reason.
set -euo pipefail
need=()
command -v storescu       >/dev/null || need+=(dcmtk)
command -v dciodvfy       >/dev/null || need+=(dicom3tools)
command -v Orthanc        >/dev/null || need+=(orthanc)
command -v redis-server   >/dev/null || need+=(redis-server)
command -v pg_ctlcluster  >/dev/null || need+=(postgresql)
command -v chromium       >/dev/null || need+=(chromium)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v systemd-analyze >/dev/null || need+=(systemd)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
