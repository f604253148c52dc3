#!/usr/bin/env bash
# Install the Debian tools the tests use as real peers and judges, when missing.
# As root it installs them; otherwise it says what to run, and the tests that need
# a missing tool skip with that command as the reason.
set -euo pipefail
need=()
# pynetdicom puts its own storescu in the venv: only a storescu whose --version names dcmtk counts
have_dcmtk() {
    local dir IFS=:
    for dir in $PATH; do
        [ -x "$dir/storescu" ] && "$dir/storescu" --version 2>/dev/null | grep -qi dcmtk && return 0
    done
    return 1
}
have_dcmtk                          || need+=(dcmtk)
command -v dciodvfy       >/dev/null || need+=(dicom3tools)
command -v Orthanc        >/dev/null || need+=(orthanc)
command -v redis-server   >/dev/null || need+=(redis-server)
command -v pg_ctlcluster  >/dev/null || need+=(postgresql)
command -v chromium       >/dev/null || need+=(chromium)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v strace         >/dev/null || need+=(strace)  # bench-ingest counts each receiver's flush calls
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
