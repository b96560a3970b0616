#!/bin/sh
# Create the system user the update client's unprivileged fetch process runs
# as (what src/rampart/data/sysusers.d/rampart.conf declares on a device).
# Idempotent; needs root (or sudo).
set -eu
user=rampart-fetch
if getent passwd "$user" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "setup: creating system user $user"
$SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    --user-group --comment "Rampart update downloader" "$user"
