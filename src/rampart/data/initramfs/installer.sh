# shellcheck shell=dash
# ---- the payload disk and the Core that installs itself ------------------------
panic=  # a failed installation powers off (the device's panic= would loop it)
for pair in "@INSTALL_TARGET_KEY@:$install_target" "@INSTALL_PAYLOAD_KEY@:$install_payload"; do
    param=@INSTALLER_PREFIX@${pair%%:*} disk=${pair#*:}
    case $disk in
        '') fail "the installer needs $param=/dev/<disk> on the kernel command line" ;;
        /dev/*/* | /dev/ | *[!a-z0-9/]*) fail "$param=$disk is not /dev/<disk>" ;;
        /dev/*) ;;
        *) fail "$param=$disk is not /dev/<disk>" ;;
    esac
done
[ "$install_target" != "$install_payload" ] || fail "the target disk is the payload disk"
deadline=$(($(date +%s) + rootdelay))
until [ -b "$install_payload" ] && [ -b "$install_target" ]; do
    [ "$(date +%s)" -lt "$deadline" ] ||
        fail "the disks $install_target and $install_payload did not appear"
    sleep 0.5
done
mkdir -p /payload "$NEWROOT"
mount -t ext4 -o ro,nosuid,nodev,noexec "$install_payload" /payload >"$LOG" 2>&1 ||
    fail "cannot mount the payload disk $install_payload: $(reason)"
image=/payload/core-${lv#@SLOT_PREFIX@}.img
[ -f "$image" ] || fail "the payload disk has no core-${lv#@SLOT_PREFIX@}.img"
set -- veritysetup open "$image" "$name" "$image" "$roothash" \
    "--hash-offset=$hashoffset" "--data-blocks=$datablocks"
if [ -n "$fecoffset" ]; then
    set -- "$@" "--fec-device=$image" "--fec-offset=$fecoffset" "--fec-roots=$fecroots"
fi
"$@" >"$LOG" 2>&1 || fail "cannot open $image with dm-verity: $(reason)"
dd "if=/dev/mapper/$name" of=/dev/null bs=4096 count=1 >"$LOG" 2>&1 ||
    fail "cannot open $image with dm-verity: its first block does not match the root hash"
mount -t squashfs -o ro "/dev/mapper/$name" "$NEWROOT" >"$LOG" 2>&1 ||
    fail "cannot mount $image (squashfs on dm-verity): $(reason)"
[ -x "$NEWROOT/usr/bin/rampart" ] || fail "the Core in $image has no /usr/bin/rampart"
for dir in dev proc sys run; do
    mount --bind "/$dir" "$NEWROOT/$dir" || fail "cannot bind /$dir into the installer"
done
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$NEWROOT/tmp" || fail "cannot mount /tmp"
mkdir -p "$NEWROOT/run/payload" "$NEWROOT/run/lvm"
mount --bind /payload "$NEWROOT/run/payload" || fail "cannot bind the payload into the installer"
in_core() { chroot "$NEWROOT" "$@"; }
in_core /lib/systemd/systemd-udevd --daemon --resolve-names=never >"$LOG" 2>&1 ||
    fail "cannot start udevd in the installer: $(reason)"
in_core udevadm trigger --type=all --action=add >/dev/null 2>&1
in_core udevadm settle --timeout=30 >/dev/null 2>&1
echo "rampart-install: installing ${lv#@SLOT_PREFIX@} on $install_target"
umask 022
# shellcheck disable=SC2086  # $install_wipe: no word at all, or --wipe; the size is
# checked by rampart install itself
in_core /usr/bin/rampart install --target "$install_target" --payload /run/payload $install_wipe \
    ${install_state_size:+"--state-size=$install_state_size"}
rc=$?
in_core udevadm control --exit >/dev/null 2>&1
sync
if [ "$rc" -eq 0 ]; then
    echo "rampart-install: done"
else
    echo 1 >/proc/sys/kernel/printk 2>/dev/null
    echo "rampart-install: failed (exit code $rc)"
fi
sleep 1
poweroff -f
while :; do sleep 3600; done
