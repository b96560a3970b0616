# shellcheck shell=dash
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
umask 077
set -f  # command-line words are never globbed

KVER='@KVER@'
REQUIRED_MODULES='@REQUIRED_MODULES@'
BEST_EFFORT_MODULES='@BEST_EFFORT_MODULES@'
FAIL_DELAY=@FAIL_DELAY@
NEWROOT=/newroot
LOG=/run/rampart/log

stop() {
    action=poweroff
    delay=$FAIL_DELAY
    case $panic in
        '' | 0 | *[!0-9-]* | ?*-*) ;;
        -*) action=reboot; delay=0 ;;
        *) action=reboot; delay=$panic ;;
    esac
    sync
    sleep "$delay"
    "$action" -f
    while :; do sleep 3600; done
}

fail() {
    echo 1 >/proc/sys/kernel/printk 2>/dev/null  # no kernel message inside the line
    echo "rampart: $*"
    stop
}

# The first meaningful line a tool wrote to $LOG (warnings skipped).
reason() {
    line=$(sed -e 's/^[[:space:]]*//' -e '/^$/d' -e '/^WARNING/d' "$LOG" 2>/dev/null | head -n 1)
    echo "${line:-no error output}"
}

# Activate LV $1 of $vg, retrying until $rootdelay seconds have passed since
# the first try (a disk may appear late). The reason is left in $LOG.
activate() {
    deadline=$(($(date +%s) + rootdelay))
    until lvm lvchange -ay "$vg/$1" >"$LOG" 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.5
    done
    [ -b "/dev/$vg/$1" ] || { echo "/dev/$vg/$1 did not appear" >"$LOG"; return 1; }
}
