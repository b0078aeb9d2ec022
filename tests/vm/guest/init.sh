#!/bin/sh
# /init of the e2e guest's initramfs: load the virtio block driver (a module in Debian's kernel),
# mount the root named by root= read-only and hand over to systemd.  If the root never appears the
# script exits, the kernel panics and panic=N resets the VM: that is how the "failed kernel" UKI
# (root= naming a partition that does not exist) fails.
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev
for module in $(busybox cat /lib/modules/load-order); do
    busybox insmod "/lib/modules/$module"
done
root=
for arg in $(busybox cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; esac
done
tries=0
while [ ! -b "$root" ] && [ "$tries" -lt 100 ]; do
    busybox sleep 0.1
    tries=$((tries + 1))
done
busybox mkdir -p /newroot
if ! busybox mount -o ro -t ext4 "$root" /newroot; then
    echo "initrd: cannot mount the root file system '$root'"
    exit 1
fi
busybox umount /proc
busybox umount /sys
busybox mount --move /dev /newroot/dev
exec busybox switch_root /newroot /sbin/init
