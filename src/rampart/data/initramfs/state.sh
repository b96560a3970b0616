# shellcheck shell=dash
# ---- functions: the rollback counter and the state partition -----------------
# Host tests run this section on its own with fake commands (and the real
# tpm2-tools against swtpm): it reads and writes only under $RUN, $ESP_MNT,
# $SYS_BLOCK and $PRINTK, and reaches the TPM through $TPM2TOOLS_TCTI
# (default device:/dev/tpmrm0).
RUN=/run/rampart
ESP_MNT=/run/esp
SYS_BLOCK=/sys/class/block
PRINTK=/proc/sys/kernel/printk
SEALED=@SEALED_DIR@  # on the ESP: rampart.device.layout.SEALED_DIR

# The device node of a device: TCTI; nothing for another TCTI (swtpm).
tpm_node() {
    local tcti=${TPM2TOOLS_TCTI:-device:/dev/tpmrm0}
    case $tcti in
        device) echo /dev/tpmrm0 ;;
        device:*) tcti=${tcti#device:}; echo "${tcti:-/dev/tpmrm0}" ;;
    esac
}

tpm_present() {
    local node
    node=$(tpm_node)
    [ -z "$node" ] || [ -e "$node" ]
}

# The TPM's rollback counter (NV index @COUNTER_INDEX@: 8 bytes, big-endian)
# as 16 hex digits. Zero without a TPM, or when the index is not defined or was
# never incremented (tpm2_nvread fails), as rampart.device.tpm.Tpm.counter reads it.
counter_hex() {
    local hex=
    if tpm_present; then
        hex=$(tpm2_nvread -C o -s 8 @COUNTER_INDEX@ 2>/dev/null | od -An -v -tx1 | tr -d ' \n')
    fi
    case $hex in *[!0-9a-f]*) hex= ;; esac
    [ "${#hex}" -eq 16 ] || hex=0000000000000000
    echo "$hex"
}

# Stop unless the Core's security epoch ($epoch, from rampart.epoch) is at least
# the TPM's rollback counter, which the running system raises once a release is
# good: an older release, with the vulnerabilities it fixed, must not boot.
# Without a TPM the counter is 0 (no offline rollback protection).
check_epoch() {
    local hex
    hex=$(counter_hex)
    case $hex in
        [0-7]*) [ "$((0x$hex))" -gt "$epoch" ] || return 0 ;;
    esac
    # ($hex from 8 up is 2^63 or more: above every epoch.)
    fail "Core $core has security epoch $epoch, below the TPM's rollback counter" \
        "$(printf %u "0x$hex"): refusing to boot an older version"
}

# The whole disk a block device is on: a partition's parent in sysfs, else itself.
disk_of() {
    local path
    path=$(readlink -f "$SYS_BLOCK/$1") || path=$1
    [ -e "$path/partition" ] && path=${path%/*}
    echo "${path##*/}"
}

# The ESP: the GPT partition named "esp" (PARTNAME in sysfs: there is no udev
# here), preferably on a disk holding a physical volume of $vg. Prints its name.
find_esp() {
    # shellcheck disable=SC1007  # empty values
    local pv disks= uevent name first=
    for pv in $(lvm pvs --noheadings -o pv_name --select "vg_name=$vg" 2>/dev/null); do
        disks="$disks $(disk_of "${pv##*/}")"
    done
    set +f
    for uevent in "$SYS_BLOCK"/*/uevent; do
        grep -qx PARTNAME=@ESP_PARTLABEL@ "$uevent" 2>/dev/null || continue
        name=${uevent%/uevent}
        name=${name##*/}
        case " $disks " in *" $(disk_of "$name") "*) first=$name && break ;; esac
        [ -n "$first" ] || first=$name
    done
    set -f
    [ -n "$first" ] && echo "$first"
}

# Copy the sealed state key from the ESP into $RUN (tmpfs); the ESP is mounted
# read-only for that moment only. Sets $why and fails when it cannot.
fetch_sealed() {
    local esp copied=no
    rm -f "$RUN/@SEALED_PUB@" "$RUN/@SEALED_PRIV@" "$RUN/@SEALED_PCRS@"
    esp=$(find_esp) || { why="no ESP (no partition named @ESP_PARTLABEL@)"; return 1; }
    mkdir -p "$ESP_MNT"
    if ! mount -t vfat -o ro,nosuid,nodev,noexec "/dev/$esp" "$ESP_MNT" >"$LOG" 2>&1; then
        why="cannot mount the ESP /dev/$esp: $(reason)"
        return 1
    fi
    cp "$ESP_MNT/$SEALED/@SEALED_PUB@" "$ESP_MNT/$SEALED/@SEALED_PRIV@" \
        "$ESP_MNT/$SEALED/@SEALED_PCRS@" "$RUN/" >"$LOG" 2>&1 && copied=yes
    # A key sealed to more than one set of PCR values: its PolicyOR's branches (no
    # glob: /init runs with globbing off).
    for n in 0 1 2 3 4 5 6 7; do
        rm -f "$RUN/@SEALED_BRANCH@$n"
        [ -f "$ESP_MNT/$SEALED/@SEALED_BRANCH@$n" ] || continue
        cp "$ESP_MNT/$SEALED/@SEALED_BRANCH@$n" "$RUN/" >"$LOG" 2>&1 || copied=
    done
    umount "$ESP_MNT" >/dev/null 2>&1
    [ "$copied" = yes ] && return 0
    why="no sealed state key on the ESP /dev/$esp ($SEALED/@SEALED_PUB@, @SEALED_PRIV@, @SEALED_PCRS@)"
    return 1
}

# The PolicyOR of a key sealed to more than one set of PCR values ($RUN/state.branch0
# to 7, from the ESP), in the session $RUN/session.ctx; nothing to do without them.
# tpm2_policyor fails when the PCRs hold none of the branches' values.
tpm_policy_or() {
    local n list=''
    for n in 0 1 2 3 4 5 6 7; do
        [ -f "$RUN/@SEALED_BRANCH@$n" ] && list="${list:+$list,}$RUN/@SEALED_BRANCH@$n"
    done
    [ -z "$list" ] || tpm2_policyor -S "$RUN/session.ctx" -l "sha256:$list"
}

# Unseal the state key as rampart.device.tpm.Tpm.unseal does and open the LUKS2 volume
# $1 with it (keyslot @TPM_KEYSLOT@) as /dev/mapper/state. The key goes from
# tpm2_unseal's stdout straight into cryptsetup's stdin: never into a file, a
# variable or an argument. Sets $why and fails when the volume is not open.
tpm_open_state() {
    local dev=$1 pcrs status=
    why=
    tpm_present || { why="no TPM"; return 1; }
    fetch_sealed || return 1
    pcrs=$(cat "$RUN/@SEALED_PCRS@")
    case $pcrs in
        sha256:[0-9]*) case ${pcrs#sha256:} in *[!0-9,]*) pcrs= ;; esac ;;
        *) pcrs= ;;
    esac
    if [ -z "$pcrs" ]; then
        why="the PCR selection $SEALED/@SEALED_PCRS@ on the ESP is not sha256:<PCRs>"
        return 1
    fi
    if ! tpm2_load -Q -C @PRIMARY_HANDLE@ -u "$RUN/@SEALED_PUB@" -r "$RUN/@SEALED_PRIV@" \
        -c "$RUN/state.ctx" >"$LOG" 2>&1; then
        tpm2_flushcontext -t >/dev/null 2>&1
        why="the TPM cannot load the sealed state key (sealed by another TPM?)"
        return 1
    fi
    if ! tpm2_startauthsession --policy-session -S "$RUN/session.ctx" >"$LOG" 2>&1; then
        why="the TPM cannot start a policy session: $(reason)"
    elif ! tpm2_policypcr -Q -S "$RUN/session.ctx" -l "$pcrs" >"$LOG" 2>&1; then
        why="the TPM cannot apply the policy on PCR $pcrs: $(reason)"
    elif ! tpm_policy_or >"$LOG" 2>&1; then
        status="unseal=policy"  # PCR $pcrs holds none of the sealed values
    else
        # unseal=<its status> on fd 3, then open=<cryptsetup's>, into $status.
        status=$({
            { tpm2_unseal -c "$RUN/state.ctx" -p "session:$RUN/session.ctx" 2>/dev/null
              echo "unseal=$?" >&3; } |
                cryptsetup open --type luks2 --key-slot @TPM_KEYSLOT@ --key-file=- "$dev" @STATE_MAPPER@ \
                    >"$LOG" 2>&1 3>&-
            echo "open=$?"
        } 3>&1)
    fi
    tpm2_flushcontext "$RUN/session.ctx" >/dev/null 2>&1
    tpm2_flushcontext -t >/dev/null 2>&1
    rm -f "$RUN/state.ctx" "$RUN/session.ctx"
    [ -z "$why" ] || return 1
    case $status in
        *unseal=0*open=0*) return 0 ;;
        *unseal=0*open=2*) why="the unsealed key does not open $vg/@STATE_LV@" ;;
        *unseal=0*) why="cannot open $vg/@STATE_LV@ with the unsealed key: $(reason)" ;;
        *) why="the TPM refuses to unseal the state key: PCR $pcrs differs from when"
           why="$why it was sealed (Secure Boot disabled or its keys changed)" ;;
    esac
    return 1
}

# Open the state partition $vg/core_state (LUKS2) as /dev/mapper/state: with the
# key the TPM unseals, else with the recovery passphrase typed on the console
# (keyslot @RECOVERY_KEYSLOT@), after one line saying why. Sets $state.
open_state() {
    local dev=/dev/$vg/@STATE_LV@ pass level status
    activate @STATE_LV@ ||
        fail "cannot activate the state partition $vg/@STATE_LV@ with LVM: $(reason)"
    cryptsetup isLuks --type luks2 "$dev" >"$LOG" 2>&1 ||
        fail "the state partition $vg/@STATE_LV@ is not a LUKS2 volume"
    if tpm_open_state "$dev"; then
        echo "rampart: state partition unlocked with the TPM"
    else
        level=$(cat "$PRINTK" 2>/dev/null)
        level=${level%%[!0-9]*}
        echo 1 >"$PRINTK" 2>/dev/null  # no kernel message inside the prompt
        echo "rampart: $why; enter the recovery passphrase for $vg/@STATE_LV@"
        # Read here, not by cryptsetup: it flushes what was typed before its
        # prompt, and its own messages would follow the line above. No echo from
        # before the prompt on.
        stty -echo 2>/dev/null
        printf 'Enter passphrase for %s: ' "$dev"
        # shellcheck disable=SC3045  # busybox ash's read has -s (dash's has not)
        IFS= read -rs pass || :  # (at the end of input: what was typed, if any)
        stty echo 2>/dev/null
        echo
        # cryptsetup exits 2 for a passphrase that opens no keyslot; anything else
        # is a failure of its own, said as such.
        status=0
        printf %s "$pass" | cryptsetup open --type luks2 --tries=1 \
            --key-slot @RECOVERY_KEYSLOT@ --key-file=- "$dev" @STATE_MAPPER@ >"$LOG" 2>&1 || status=$?
        pass=
        case $status in
            0) ;;
            2) fail "the recovery passphrase does not open the state partition $vg/@STATE_LV@" ;;
            *) fail "cryptsetup cannot open $vg/@STATE_LV@ (exit $status): $(reason)" ;;
        esac
        [ -z "$level" ] || echo "$level" >"$PRINTK" 2>/dev/null
        echo "rampart: state partition unlocked with the recovery passphrase"
    fi
    state=/dev/mapper/@STATE_MAPPER@
}
# ---- end of functions ---------------------------------------------------------
