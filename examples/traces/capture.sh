#!/bin/sh
# Re-record the qemu72-*.trace files of this directory (see README.md).
#
# Needs qemu-system-x86 (Debian 12: QEMU 7.2, `apt-get install qemu-system-x86`), ovmf for the
# pflash trace, and a usable /dev/kvm. No disk image: SeaBIOS finds nothing to boot, which is
# fine; each QEMU runs a few seconds under `timeout`, so none is left behind.
# Usage: capture.sh [OUTDIR]   (default: the directory of this script)
# Userspace addresses (ua=) differ from run to run (ASLR); everything else is deterministic.
set -eu

OUT=${1:-$(dirname "$0")}
QEMU=${QEMU:-qemu-system-x86_64}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
ulimit -c 0  # the 9 TiB run aborts on purpose; no core file

TRACE="-trace kvm_set_user_memory -trace kvm_clear_dirty_log"
BASE="-enable-kvm -display none -serial none"

# boot NAME SECONDS QEMU-ARGS...: boot without a monitor, trace to OUT/NAME.trace
boot() {
    name=$1 secs=$2
    shift 2
    rm -f "$OUT/$name.trace"
    # shellcheck disable=SC2086
    timeout -k 5 "$secs" "$QEMU" $BASE -monitor none $TRACE -D "$OUT/$name.trace" "$@" \
        >/dev/null 2>&1 || true
    report "$name"
}

report() {
    if [ ! -s "$OUT/$1.trace" ] || [ "$(tail -c 1 "$OUT/$1.trace" | od -An -c | tr -d ' ')" != '\n' ]; then
        echo "$1: empty or cut short (slow host?); run again" >&2
        exit 1
    fi
    echo "$1: $(wc -l <"$OUT/$1.trace") lines"
}

# drive NAME COMMANDS QEMU-ARGS...: as boot, with HMP COMMANDS (one per line) typed on the
# monitor 8 s after start (SeaBIOS has given up by then), 2 s apart, then quit
drive() {
    name=$1 commands=$2
    shift 2
    rm -f "$OUT/$name.trace"
    # shellcheck disable=SC2086
    { sleep 8; printf '%s\n' "$commands" | while IFS= read -r c; do echo "$c"; sleep 2; done
      echo quit; } |
        timeout -k 5 60 "$QEMU" $BASE -monitor stdio $TRACE -D "$OUT/$name.trace" "$@" \
        >/dev/null 2>&1 || true
    report "$name"
}

boot qemu72-pc-128m 8 -machine pc -m 128M
boot qemu72-q35-128m 8 -machine q35 -m 128M
boot qemu72-pc-4g 8 -machine pc -m 4G
boot qemu72-q35-4g 8 -machine q35 -m 4G
boot qemu72-pc-nic-roms 8 -machine pc -m 128M -vga none -nic none \
    -device virtio-net-pci -device e1000,romfile=pxe-e1000.rom
drive qemu72-pc-dimm-hotplug "object_add memory-backend-ram,id=m2,size=256M
device_add pc-dimm,id=d2,memdev=m2" \
    -machine pc -m 1G,slots=2,maxmem=4G \
    -object memory-backend-ram,id=m1,size=512M -device pc-dimm,id=d1,memdev=m1
drive qemu72-pc-migrate 'migrate "exec:cat > /dev/null"
info migrate' \
    -machine pc -m 128M -msg timestamp=on \
    -trace kvm_set_ioeventfd_pio -trace 'migration_bitmap_sync_*'
boot qemu72-pc-9t-einval 20 -machine pc,memory-backend=m0 -cpu max,phys-bits=46 \
    -object memory-backend-ram,id=m0,size=9T,reserve=off -m 9T
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$TMP/vars.fd"
boot qemu72-q35-ovmf-pflash 10 -machine q35 -m 256M -nic none \
    -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
    -drive "if=pflash,format=raw,file=$TMP/vars.fd"
