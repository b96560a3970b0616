# shellcheck shell=dash
# ---- kernel modules ------------------------------------------------------
[ "$(uname -r)" = "$KVER" ] ||
    fail "this initramfs has kernel modules for $KVER, but the kernel is $(uname -r)"
for m in $BEST_EFFORT_MODULES; do
    modprobe -q "$m" >/dev/null 2>&1 || :
done
for m in $REQUIRED_MODULES; do
    modprobe "$m" >"$LOG" 2>&1 || fail "cannot load kernel module $m: $(reason)"
done
