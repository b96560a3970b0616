# shellcheck shell=dash
# ---- rollback protection: the security epoch against the TPM's counter ----
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
check_epoch

# ---- Core: LVM, dm-verity, read-only root ------------------------------------
activate "$lv" || fail "cannot activate Core $core with LVM: $(reason)"
data=/dev/$vg/$lv
set -- veritysetup open "$data" "$name" "$data" "$roothash" \
    "--hash-offset=$hashoffset" "--data-blocks=$datablocks"
if [ -n "$fecoffset" ]; then
    set -- "$@" "--fec-device=$data" "--fec-offset=$fecoffset" "--fec-roots=$fecroots"
fi
"$@" >"$LOG" 2>&1 || fail "cannot open Core $core with dm-verity: $(reason)"
[ -b "/dev/mapper/$name" ] ||
    fail "cannot open Core $core with dm-verity: /dev/mapper/$name did not appear"
# veritysetup does not read the tree; reading block 0 checks the root hash
# against it now (every later block is checked by the kernel when read).
dd "if=/dev/mapper/$name" of=/dev/null bs=4096 count=1 >"$LOG" 2>&1 ||
    fail "cannot open Core $core with dm-verity: its first block does not match" \
        "the root hash (wrong root hash or corrupted Core)"
mkdir -p "$NEWROOT"
mount -t squashfs -o ro "/dev/mapper/$name" "$NEWROOT" >"$LOG" 2>&1 ||
    fail "cannot mount Core $core (squashfs on dm-verity): $(reason)"
for dir in dev proc sys run @STATE_MOUNT_DIR@; do
    [ -d "$NEWROOT/$dir" ] || fail "Core $core has no /$dir directory"
done
[ -e "$NEWROOT/sbin/init" ] || [ -L "$NEWROOT/sbin/init" ] || fail "Core $core has no /sbin/init"

# ---- the state partition: LUKS2, unlocked by the TPM or the recovery passphrase
open_state
mount -t ext4 -o rw,nosuid,nodev "$state" "$NEWROOT@STATE_MOUNT@" >"$LOG" 2>&1 ||
    fail "cannot mount the state partition $state on @STATE_MOUNT@: $(reason)"

# ---- switch root ------------------------------------------------------------------
echo "rampart: booting Core $core (dm-verity root hash $roothash)"
for dir in dev proc sys run; do
    mount --move "/$dir" "$NEWROOT/$dir" || fail "cannot move /$dir into Core $core"
done
umask 022
exec switch_root "$NEWROOT" /sbin/init
