#!/bin/sh
# make demo: keys, two dummy releases published into a webroot, audited.
set -eu
cd "$(dirname "$0")/.."
RAMPART=.venv/bin/rampart
WORK=demo-work
rm -rf "$WORK"
mkdir -p "$WORK/payloads"
# The demo key is encrypted like a real vendor key; automation passes the
# password through the environment (never on the command line).
RAMPART_PASSWORD=demo-password
export RAMPART_PASSWORD

echo "== generating a vendor key pair (scrypt with minisign's parameters: a few seconds)"
$RAMPART keygen --secret-key "$WORK/vendor.key" --public-key "$WORK/vendor.pub"

for v in 1.0.0 1.0.1; do
    head -c 65536 /dev/urandom > "$WORK/payloads/core-$v"
    head -c 16384 /dev/urandom > "$WORK/payloads/efiboot-$v"
    echo "== publishing clipos $v"
    $RAMPART publish --webroot "$WORK/webroot" --os clipos --version "$v" \
        --core "$WORK/payloads/core-$v" --efiboot "$WORK/payloads/efiboot-$v" \
        --secret-key "$WORK/vendor.key"
done

echo "== publishing 1.0.1 to the beta channel as well"
$RAMPART publish --webroot "$WORK/webroot" --os clipos --version 1.0.1 --channel beta \
    --core "$WORK/payloads/core-1.0.1" --efiboot "$WORK/payloads/efiboot-1.0.1" \
    --secret-key "$WORK/vendor.key"

echo "== trying to move the default channel back to 1.0.0 (refused)"
if $RAMPART publish --webroot "$WORK/webroot" --os clipos --version 1.0.0 \
    --core "$WORK/payloads/core-1.0.0" --efiboot "$WORK/payloads/efiboot-1.0.0" \
    --secret-key "$WORK/vendor.key"; then
    echo "demo: a downgrade was accepted" >&2; exit 1
fi

echo "== auditing the webroot"
$RAMPART webroot check "$WORK/webroot" --public-key "$WORK/vendor.pub"

echo "== verifying a payload with the minisign tool itself"
minisign -V -p "$WORK/vendor.pub" -m "$WORK/webroot/dist/1.0.1/clipos-core" \
    -x "$WORK/webroot/dist/1.0.1/clipos-core.sig"

echo "== the webroot"
find "$WORK/webroot" | sort | sed "s|^$WORK/||"
echo "== update/v1/clipos/version"
cat "$WORK/webroot/update/v1/clipos/version"
