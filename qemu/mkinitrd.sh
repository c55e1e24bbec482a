#!/bin/sh
# Builds a tiny busybox initramfs that loads the virtio and ext4 modules of a
# Debian kernel package, mounts /dev/vda and switches to its /sbin/init.
#   mkinitrd.sh KERNEL_PKG_DIR KVER BUSYBOX OUT.gz
# KERNEL_PKG_DIR is the extracted linux-image deb (lib/modules/KVER inside),
# after `depmod -b`. Debian's cloud/armmp kernels build virtio as modules, so
# the kernel cannot mount its root without this.
set -eu
pkg=$1 kver=$2 busybox=$3 out=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/dev" "$work/proc" "$work/sys" "$work/newroot" "$work/modules"
cp "$busybox" "$work/bin/busybox"
for m in virtio_pci virtio_blk virtio_net ext4; do
    # --show-depends prints "insmod /path/mod.ko" for the module and its deps, in load order;
    # modules built into this kernel print "builtin ..." and need nothing.
    modprobe -d "$pkg" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' >"$work/order"
: >"$work/modules/load"
while read -r ko; do
    name=$(basename "$ko")
    cp "$ko" "$work/modules/$name"
    case "$name" in
        *.xz) xz -d "$work/modules/$name"; name=${name%.xz} ;;
        *.zst) zstd -q -d --rm "$work/modules/$name"; name=${name%.zst} ;;
    esac
    echo "$name" >>"$work/modules/load"
done <"$work/order"
cat >"$work/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
while read -r m; do /bin/busybox insmod "/modules/$m" 2>/dev/null; done </modules/load
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do /bin/busybox sleep 0.1; i=$((i + 1)); done
/bin/busybox mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; exec /bin/busybox sh; }
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
INIT
chmod 755 "$work/init"
(cd "$work" && find . -path ./order -prune -o -print | cpio -o -H newc --quiet) | gzip -9 >"$out"
