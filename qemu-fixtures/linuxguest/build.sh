#!/usr/bin/env bash
# Build the linuxguest: the workload (static C), and an initramfs with
# busybox-static, the virtio modules of the given kernel, and /init.
# Usage: build.sh KERNEL_TREE OUT_DIR   (KERNEL_TREE: a dpkg -x of linux-image-*)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ktree=$1
out=$2
mkdir -p "$out"
kver=$(ls "$ktree/lib/modules" | head -n 1)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib/modules"
gcc -static -O2 -Wall -Wextra -Werror -o "$stage/workload" "$here/workload.c"
gcc -static -O2 -Wall -Wextra -Werror -o "$stage/netsvc" "$here/netsvc.c"
cp /bin/busybox "$stage/bin/busybox"
install -m 0755 "$here/init" "$stage/init"
# In dependency order; /init loads them as listed.
modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console virtio_blk failover net_failover virtio_net"
for m in $modules; do
    echo "$m" >> "$stage/lib/modules/order"
done
for m in $modules; do
    f=$(find "$ktree/lib/modules/$kver" -name "$m.ko*" | head -n 1)
    case "$f" in
        *.xz) xz -dc "$f" > "$stage/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" > "$stage/lib/modules/$m.ko" ;;
        *) cp "$f" "$stage/lib/modules/$m.ko" ;;
    esac
done
(cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/linuxguest-initrd.gz"
cp "$ktree/boot/vmlinuz-$kver" "$out/linuxguest-vmlinuz"
echo "$kver" > "$out/linuxguest-kernel-version"
