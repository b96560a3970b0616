#!/bin/sh
# make demo: the whole local flow on embedded defaults.
#  1. vendor: keys, real releases 1.0.0 and 1.0.1 (a squashfs Core with its verity tree
#     and an unsigned UKI booting it, built by `rampart build core|efiboot` with the
#     kernel `make setup` fetched) published into a static webroot, audited;
#  2. server: `rampart serve` over HTTPS on loopback (SQLite, a demo CA);
#  3. device: a file-backed device running 1.0.0 updates itself to 1.0.1;
#  4. the fleet view: what the server recorded.
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

KERNEL=.cache/kernel/vmlinuz
# A stand-in initramfs (the demo never boots these UKIs; `rampart build initramfs`
# builds the real one from a kernel package).
mkdir -p "$WORK/initrd-root"
printf '#!/bin/sh\necho "rampart demo initramfs"\n' > "$WORK/initrd-root/init"
(cd "$WORK/initrd-root" && echo init | cpio --quiet -o -H newc) > "$WORK/payloads/initrd.cpio"

for v in 1.0.0 1.0.1; do
    echo "== building clipos $v: Core (squashfs + dm-verity) and its EFI binary (UKI)"
    mkdir -p "$WORK/rootfs-$v/etc"
    printf 'NAME="CLIP OS"\nID=clipos\nVERSION_ID=%s\n' "$v" > "$WORK/rootfs-$v/etc/os-release"
    $RAMPART build core "$WORK/rootfs-$v" --version "$v" --out "$WORK/payloads"
    $RAMPART build efiboot --kernel "$KERNEL" --initrd "$WORK/payloads/initrd.cpio" \
        --os clipos --version "$v" --core-meta "$WORK/payloads/core-$v.json" \
        --out "$WORK/payloads/clipos-$v.efi"
    echo "== publishing clipos $v"
    $RAMPART publish --webroot "$WORK/webroot" --os clipos --version "$v" \
        --core "$WORK/payloads/core-$v.img" --efiboot "$WORK/payloads/clipos-$v.efi" \
        --secret-key "$WORK/vendor.key"
done

echo "== publishing 1.0.1 to the beta channel as well"
$RAMPART publish --webroot "$WORK/webroot" --os clipos --version 1.0.1 --channel beta \
    --core "$WORK/payloads/core-1.0.1.img" --efiboot "$WORK/payloads/clipos-1.0.1.efi" \
    --secret-key "$WORK/vendor.key"

echo "== trying to publish 1.0.2 with Core and the EFI binary swapped (refused)"
if $RAMPART publish --webroot "$WORK/webroot" --os clipos --version 1.0.2 \
    --core "$WORK/payloads/clipos-1.0.1.efi" --efiboot "$WORK/payloads/core-1.0.1.img" \
    --secret-key "$WORK/vendor.key"; then
    echo "demo: swapped payloads were accepted" >&2; exit 1
fi

echo "== trying to move the default channel back to 1.0.0 (refused)"
if $RAMPART publish --webroot "$WORK/webroot" --os clipos --version 1.0.0 \
    --core "$WORK/payloads/core-1.0.0.img" --efiboot "$WORK/payloads/clipos-1.0.0.efi" \
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

echo
echo "== a demo CA and a server certificate for localhost"
PKI="$WORK/pki"
mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=Rampart demo CA" -keyout "$PKI/ca.key" -out "$PKI/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$PKI/server.key" -out "$PKI/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$PKI/ext"
openssl x509 -req -in "$PKI/server.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 30 -extfile "$PKI/ext" -out "$PKI/server.pem" 2>/dev/null

echo "== serving the webroot over HTTPS on loopback: rampart serve (SQLite next to the webroot)"
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$RAMPART serve --webroot "$WORK/webroot" --listen "127.0.0.1:$PORT" \
    --tls-cert "$PKI/server.pem" --tls-key "$PKI/server.key" 2> "$WORK/serve.log" &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" \
        2>/dev/null && break
    sleep 0.1
done
echo "   https://localhost:$PORT/  (channels: $($RAMPART channel list --webroot "$WORK/webroot" | tr '\n' ';'))"

echo "== a device running 1.0.0 (file backend: a directory stands in for the volume group)"
DEV="$PWD/$WORK/device"
mkdir -p "$DEV/config" "$DEV/remote" "$DEV/mainvg" "$DEV/esp/EFI/Linux"
cp "$WORK/vendor.pub" "$DEV/config/pubkey"
cat > "$DEV/config/config.toml" <<CONF
os_name = "clipos"

[core]
backend = "file"
destination = "$DEV/mainvg"
size = "1M"
capacity = "8M"

[efiboot]
destination = "$DEV/esp/EFI/Linux"
boot_tries = 3

[tpm]
# The demo device has no TPM (the host's is not its): a device node that does
# not exist means "no TPM", so there is no rollback counter to read or advance.
tcti = "device:$DEV/no-tpm"

[identity]
# The device's key (Ed25519 without a TPM), request counter and server nonce.
dir = "$DEV/identity"
CONF
cat > "$DEV/remote/remote.toml" <<CONF
update_url = "https://localhost:$PORT/update/v1"
dist_url = "https://localhost:$PORT/dist"
CONF
cp "$PKI/ca.pem" "$DEV/remote/rootca.pem"
printf 'NAME="CLIP OS"\nID=clipos\nVERSION_ID=1.0.0\n' > "$DEV/os-release"
.venv/bin/python -c 'import uuid; print(uuid.uuid4().hex)' > "$DEV/machine-id"
# What the installer would have written: Core 1.0.0 in its LV, its boot entry.
cp "$WORK/payloads/core-1.0.0.img" "$DEV/mainvg/core_1.0.0"
truncate -s 1M "$DEV/mainvg/core_1.0.0"
truncate -s 1M "$DEV/mainvg/core_state"
cp "$WORK/payloads/clipos-1.0.0.efi" "$DEV/esp/EFI/Linux/clipos-1.0.0.efi"
DEVICE_ARGS="-c $DEV/config --os-release $DEV/os-release --machine-id $DEV/machine-id --run-dir $DEV/run"

echo "== rampart status (before)"
$RAMPART status $DEVICE_ARGS
echo
echo "== rampart update"
set +e
$RAMPART update $DEVICE_ARGS -r "$DEV/remote" -t "$DEV/download"
code=$?
set -e
echo "   exit code $code (20: updated, reboot to use it)"
[ "$code" -eq 20 ]
echo
echo "== rampart status (after)"
$RAMPART status $DEVICE_ARGS
echo
echo "== the volume group and the ESP"
ls -l "$DEV/mainvg" "$DEV/esp/EFI/Linux" | sed "s|$PWD/||"
echo
echo "== the fleet, as the server saw it"
sleep 0.3
$RAMPART fleet --webroot "$WORK/webroot"
