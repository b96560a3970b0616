# ---- the command line --------------------------------------------------------
core= roothash= hashoffset= datablocks= fecoffset= fecroots= root= rootdelay=@ROOT_WAIT@
epoch=0
install_target= install_payload= install_wipe=
for word in $(cat /proc/cmdline); do
    case $word in
        rampart.core=*) core=${word#*=} ;;
        rampart.verity.roothash=*) roothash=${word#*=} ;;
        rampart.verity.hashoffset=*) hashoffset=${word#*=} ;;
        rampart.verity.datablocks=*) datablocks=${word#*=} ;;
        rampart.verity.fecoffset=*) fecoffset=${word#*=} ;;
        rampart.verity.fecroots=*) fecroots=${word#*=} ;;
        rampart.epoch=*) epoch=${word#*=} ;;
        root=*) root=${word#*=} ;;
        rootdelay=*) rootdelay=${word#*=} ;;
        panic=*) panic=${word#*=} ;;
        rampart.install.target=*) install_target=${word#*=} ;;  # the installer's
        rampart.install.payload=*) install_payload=${word#*=} ;;
        rampart.install.wipe=1) install_wipe=--wipe ;;
    esac
done

[ -n "$core" ] || fail "the kernel command line names no Core (rampart.core=<VG>/core_<version>)"
vg=${core%%/*}
lv=${core#*/}
case $core in
    */*/* | */) fail "rampart.core=$core is not <VG>/core_<version>" ;;
    */*) ;;
    *) fail "rampart.core=$core is not <VG>/core_<version>" ;;
esac
case $vg in
    '' | . | .. | -* | *[!A-Za-z0-9+_.-]*) fail "rampart.core=$core: invalid volume group name" ;;
esac
case $lv in
    core_state | core_swap | *[!A-Za-z0-9+_.-]*) fail "rampart.core=$core is not a Core LV" ;;
    core_?*) ;;
    *) fail "rampart.core=$core is not a Core LV (core_<version>)" ;;
esac
name=verity_$lv
case $roothash in
    '') fail "the kernel command line lacks rampart.verity.roothash for Core $core" ;;
    *[!0-9a-f]*) fail "rampart.verity.roothash is not lowercase hexadecimal" ;;
esac
[ "${#roothash}" -eq 64 ] || fail "rampart.verity.roothash is not 64 hexadecimal digits"
for pair in "hashoffset:$hashoffset" "datablocks:$datablocks"; do
    case ${pair#*:} in
        '') fail "the kernel command line lacks rampart.verity.${pair%%:*} for Core $core" ;;
        *[!0-9]*) fail "rampart.verity.${pair%%:*}=${pair#*:} is not a number" ;;
    esac
done
case $fecoffset:$fecroots in
    :) ;;
    *:'' | :*) fail "rampart.verity.fecoffset and rampart.verity.fecroots go together" ;;
    *[!0-9:]*) fail "rampart.verity.fecoffset or fecroots is not a number" ;;
esac
if [ -n "$root" ] && [ "$root" != "/dev/mapper/$name" ]; then
    fail "root=$root is not the Core's verity device /dev/mapper/$name"
fi
# Decimal seconds, at most 7 digits, no leading zero (ash would read 08 as octal).
case $rootdelay in '' | *[!0-9]* | 0?* | ????????*) rootdelay=@ROOT_WAIT@ ;; esac
# The security epoch (absent: 0): 1 to 19 decimal digits, at most 2^63-1, as
# rampart.vendor.cmdline.cmdline_epoch reads it. Leading zeros are dropped (ash would
# read 010 as octal); ash's arithmetic is 64-bit.
case $epoch in
    '' | *[!0-9]* | ????????????????????*) fail "rampart.epoch=$epoch is not a number" ;;
esac
value=$epoch
while case $value in 0?*) ;; *) false ;; esac do value=${value#0}; done
if [ "${#value}" -eq 19 ] && [ "$value" \> @MAX_EPOCH@ ]; then
    fail "rampart.epoch=$epoch is not a number"
fi
epoch=$value
