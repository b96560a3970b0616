# shellcheck shell=dash
# ---- mounts ----------------------------------------------------------------
panic=
mkdir -p /proc /sys /dev /run
mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount /dev (devtmpfs)"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || fail "cannot mount /run"
mkdir -p /run/rampart /run/lvm /run/lock/lvm /run/cryptsetup
