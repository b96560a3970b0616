# shellcheck shell=dash
# ---- the command line --------------------------------------------------------
# shellcheck disable=SC1007  # empty values, several to a line
core= roothash= hashoffset= datablocks= fecoffset= fecroots= root= rootdelay=@ROOT_WAIT@
epoch=0
# shellcheck disable=SC1007
install_target= install_payload= install_wipe= install_state_size=
# shellcheck disable=SC2013,SC2034  # words, as the kernel splits; install_*: installer.sh's
for word in $(cat /proc/cmdline); do
    case $word in
        @CORE_PARAM@=*) core=${word#*=} ;;
        @ROOTHASH_PARAM@=*) roothash=${word#*=} ;;
        @HASHOFFSET_PARAM@=*) hashoffset=${word#*=} ;;
        @DATABLOCKS_PARAM@=*) datablocks=${word#*=} ;;
        @FECOFFSET_PARAM@=*) fecoffset=${word#*=} ;;
        @FECROOTS_PARAM@=*) fecroots=${word#*=} ;;
        @EPOCH_PARAM@=*) epoch=${word#*=} ;;
        root=*) root=${word#*=} ;;
        rootdelay=*) rootdelay=${word#*=} ;;
        panic=*) panic=${word#*=} ;;
        @INSTALL_TARGET_PARAM@=*) install_target=${word#*=} ;;  # the installer's
        @INSTALL_PAYLOAD_PARAM@=*) install_payload=${word#*=} ;;
        @INSTALL_WIPE_PARAM@=1) install_wipe=--wipe ;;
        @INSTALL_STATE_SIZE_PARAM@=*) install_state_size=${word#*=} ;;
    esac
done

[ -n "$core" ] || fail "the kernel command line names no Core (@CORE_PARAM@=<VG>/@SLOT_PREFIX@<version>)"
vg=${core%%/*}
lv=${core#*/}
case $core in
    */*/* | */) fail "@CORE_PARAM@=$core is not <VG>/@SLOT_PREFIX@<version>" ;;
    */*) ;;
    *) fail "@CORE_PARAM@=$core is not <VG>/@SLOT_PREFIX@<version>" ;;
esac
case $vg in
    '' | . | .. | -* | *[!A-Za-z0-9+_.-]*) fail "@CORE_PARAM@=$core: invalid volume group name" ;;
esac
case $lv in
    @STATE_LV@ | @SWAP_LV@ | *[!A-Za-z0-9+_.-]*) fail "@CORE_PARAM@=$core is not a Core LV" ;;
    @SLOT_PREFIX@?*) ;;
    *) fail "@CORE_PARAM@=$core is not a Core LV (@SLOT_PREFIX@<version>)" ;;
esac
name=@VERITY_MAPPER_PREFIX@$lv
case $roothash in
    '') fail "the kernel command line lacks @ROOTHASH_PARAM@ for Core $core" ;;
    *[!0-9a-f]*) fail "@ROOTHASH_PARAM@ is not lowercase hexadecimal" ;;
esac
[ "${#roothash}" -eq 64 ] || fail "@ROOTHASH_PARAM@ is not 64 hexadecimal digits"
for pair in "@HASHOFFSET_KEY@:$hashoffset" "@DATABLOCKS_KEY@:$datablocks"; do
    case ${pair#*:} in
        '') fail "the kernel command line lacks @VERITY_PREFIX@${pair%%:*} for Core $core" ;;
        *[!0-9]*) fail "@VERITY_PREFIX@${pair%%:*}=${pair#*:} is not a number" ;;
    esac
done
case $fecoffset:$fecroots in
    :) ;;
    *:'' | :*) fail "@FECOFFSET_PARAM@ and @FECROOTS_PARAM@ go together" ;;
    *[!0-9:]*) fail "@FECOFFSET_PARAM@ or @FECROOTS_KEY@ is not a number" ;;
esac
if [ -n "$root" ] && [ "$root" != "/dev/mapper/$name" ]; then
    fail "root=$root is not the Core's verity device /dev/mapper/$name"
fi
# Decimal seconds, at most 7 digits, no leading zero (ash would read 08 as octal).
case $rootdelay in '' | *[!0-9]* | 0?* | ????????*) rootdelay=@ROOT_WAIT@ ;; esac
# The security epoch (absent: 0): 1 to 19 decimal digits, at most 2^63-1, as
# rampart.release.cmdline.cmdline_epoch reads it. Leading zeros are dropped (ash would
# read 010 as octal); ash's arithmetic is 64-bit.
case $epoch in
    '' | *[!0-9]* | ????????????????????*) fail "@EPOCH_PARAM@=$epoch is not a number" ;;
esac
value=$epoch
while case $value in 0?*) ;; *) false ;; esac do value=${value#0}; done
# shellcheck disable=SC2071  # 19 digits each: as strings, as numbers, no overflow
if [ "${#value}" -eq 19 ] && [ "$value" \> @MAX_EPOCH@ ]; then
    fail "@EPOCH_PARAM@=$epoch is not a number"
fi
epoch=$value
