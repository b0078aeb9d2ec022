#!/bin/sh
# /init of the capture initramfs (busybox-static).  Prints what the firmware measured, as the
# running kernel sees it, to the serial console in delimited blocks, then powers off.
# tests/vm/capture.py parses the blocks; every FILE block carries its length and sha256 so that a
# kernel message mixed into the serial stream is detected on the host instead of being committed.
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t securityfs securityfs /sys/kernel/security
# Debian kernels build efivarfs as a module (CONFIG_EFIVAR_FS=m); capture.py packs the one that
# matches the kernel.  The TPM CRB/TIS drivers are built in.
insmod /lib/modules/efivarfs.ko
mount -t efivarfs efivarfs /sys/firmware/efi/efivars
# Nothing but our blocks on the console from here on.
echo "0 0 0 0" > /proc/sys/kernel/printk

emit_file() {  # NAME PATH
    echo "==== BEGIN FILE $1 $(wc -c < "$2") $(sha256sum "$2" | cut -d ' ' -f 1) ===="
    base64 "$2"
    echo "==== END FILE $1 ===="
}

echo "==== BEGIN PCRS ===="
for bank in sha1 sha256; do
    for n in $(seq 0 23); do
        echo "$bank $n $(cat /sys/class/tpm/tpm0/pcr-$bank/$n)"
    done
done
echo "==== END PCRS ===="

emit_file eventlog /sys/kernel/security/tpm0/binary_bios_measurements

vars=/sys/firmware/efi/efivars
for name in SecureBoot SetupMode PK KEK db dbx BootCurrent BootOrder SbatLevelRT MokListRT MokSBStateRT; do
    for f in "$vars/$name"-*; do
        [ -f "$f" ] && emit_file "efivars/${f##*/}" "$f"
    done
done
# BootCurrent is a u16 (little endian) after the 4-byte attribute word.  Read the whole file:
# efivarfs files cannot seek, so `od -j` fails on them.
set -- $(od -An -tx1 "$vars"/BootCurrent-8be4df61-93ca-11d2-aa0d-00e098032b8c)
boot="Boot$(echo "$6$5" | tr a-f A-F)-8be4df61-93ca-11d2-aa0d-00e098032b8c"
[ -f "$vars/$boot" ] && emit_file "efivars/$boot" "$vars/$boot"

echo "==== CAPTURE DONE ===="
poweroff -f
