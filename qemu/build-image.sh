#!/bin/bash
# Builds one test image from Debian packages only:
#   build-image.sh ARCH OUTDIR        ARCH = arm64 | armhf
# OUTDIR gets rootfs.img (raw ext4, sparse), vmlinuz, initrd.gz, kver.
# The rootfs is debootstrap --variant=minbase run under qemu-user binfmt, plus
# the packages in packages.txt, a venv /opt/edgeagent (system site packages,
# so Debian's python3-zstandard etc. are used) holding the wheels.txt wheels,
# and the boot units in image/. edgeagent itself is NOT in the image: the
# runner installs a wheel of the checkout on each run (see guest/setup.sh).
# Needs root, binfmt_misc with qemu-aarch64/qemu-arm, and `apt-get update` done
# with the foreign architecture added (qemu/setup-host does all that).
set -euo pipefail
arch=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
case "$arch" in
    arm64) kflavour=cloud-arm64 ;;
    armhf) kflavour=armmp-lpae ;;
    *) echo "build-image: unknown arch $arch (arm64|armhf)" >&2; exit 2 ;;
esac
suite=${EDGEAGENT_QEMU_SUITE:-bookworm}
mirror=${EDGEAGENT_QEMU_MIRROR:-$("$here/setup-host" --mirror)}
mkdir -p "$out"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'umount -R "$work/rootfs/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
log() { echo "build-image[$arch] $(date -u +%T) $*" >&2; }

# 1. Kernel and busybox from the archive; the initrd loads virtio + ext4.
kpkg=$("$here/setup-host" --kernel-package "$arch")
kver=${kpkg#linux-image-}; kver=${kver%%:*}
log "kernel $kpkg"
(cd "$work" && apt-get download -q "$kpkg" "busybox-static:$arch" >/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
depmod -b "$work/kernel" "$kver"
"$here/mkinitrd.sh" "$work/kernel" "$kver" "$work/busybox/bin/busybox" "$work/initrd.gz"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

# 2. Root filesystem.
packages=$(grep -v '^\s*#' "$here/packages.txt" | grep -v '^\s*$' | paste -sd, -)
log "debootstrap $suite (a few minutes under qemu-user)"
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    debootstrap --arch="$arch" --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
root=$work/rootfs
cp -a "$here/image/." "$root/"
echo edgeqemu >"$root/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\ntmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0\n' >"$root/etc/fstab"
sed -i 's/^root:[^:]*:/root::/' "$root/etc/shadow"      # a test image: no password
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en*\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/50-dhcp.network"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/"
mkdir -p "$root/etc/systemd/system/network-online.target.wants"
ln -sf /lib/systemd/system/systemd-networkd-wait-online.service "$root/etc/systemd/system/network-online.target.wants/"
# No background traffic or disk churn from timers during a test.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer \
    systemd-timesyncd.service getty@tty1.service serial-getty@ttyAMA0.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
ln -sf /etc/systemd/system/edgetest-setup.service "$root/etc/systemd/system/multi-user.target.wants/"
ln -sf /etc/systemd/system/edgetest.service "$root/etc/systemd/system/multi-user.target.wants/"

# 3. The venv with the wheels Debian lacks (pure Python, no compiler needed).
log "venv + wheels"
mkdir -p "$root/tmp/wheels"
grep -v '^\s*#' "$here/wheels.txt" | grep -v '^\s*$' | xargs "${PYTHON:-python3}" -m pip download -q --no-deps \
    --only-binary=:all: -d "$root/tmp/wheels"
mount -t proc proc "$root/proc"
in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$root" "$@"; }
in_root python3 -m venv --system-site-packages /opt/edgeagent
in_root sh -c '/opt/edgeagent/bin/pip install -q --disable-pip-version-check --no-index --no-deps /tmp/wheels/*.whl'
in_root /opt/edgeagent/bin/python -c 'import paho.mqtt, sqlite_utils, zstandard, tenacity, tomli_w, pyudev'
umount "$root/proc"
rm -rf "$root/tmp/wheels" "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

# 4. The disk: mkfs.ext4 -d needs no mount or loop device.
log "mkfs"
truncate -s 2G "$work/rootfs.img"
mkfs.ext4 -q -F -L edgeroot -d "$root" "$work/rootfs.img"
echo "$kver" >"$work/kver"
mv "$work/rootfs.img" "$work/vmlinuz" "$work/initrd.gz" "$work/kver" "$out/"
log "done: $out"
