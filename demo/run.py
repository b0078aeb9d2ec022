"""`make demo`: a kernel update on a sandbox confidential VM, step by step.

    .venv/bin/python demo/run.py [--workdir DIR] [--keep]

Builds a sandbox CVM from real parts (tests/sandbox.py), then does what an admin's
`dnf update kernel` + reboot would do, explaining each step.  Needs root for the last
checks (systemd's token plugin reaches swtpm inside a private mount namespace).  The
Debian kernel packages the UKIs are built from are downloaded once into cache/.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import sandbox  # noqa: E402

WIDTH = 92


def say(text: str) -> None:
    for paragraph in textwrap.dedent(text).strip().split("\n\n"):
        print(textwrap.fill(" ".join(paragraph.split()), WIDTH, break_on_hyphens=False))
        print()


def step(number: int, title: str) -> None:
    print("=" * WIDTH)
    print(f"Step {number}: {title}")
    print("=" * WIDTH)


def cli(cvm, *argv, service=False, notify_socket=None):
    """Run rhel-cvm-update as an admin would (or, with service=True, as systemd runs the
    units: $INVOCATION_ID set, $NOTIFY_SOCKET pointing at our socket)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("INVOCATION_ID", None)
    if service:
        env["INVOCATION_ID"] = "de3000000000000000000000000000de"
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = notify_socket
    shown = " ".join(["rhel-cvm-update", *argv])
    print(f"  $ {shown}" + ("    # as rhel-cvm-update.service runs it" if service else ""))
    result = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(cvm.config_path), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=600)
    for stream in (result.stdout, result.stderr):
        for line in stream.decode().splitlines():
            print("    " + line)
    print(f"    (exit status {result.returncode})")
    print()
    return result


def drain(sock):
    messages = []
    while True:
        try:
            messages.append(sock.recv(65536).decode())
        except BlockingIOError:
            return messages


def tokens(cvm):
    return {int(k): v for k, v in cvm.luks_json()["tokens"].items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to build the sandbox (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox directory afterwards")
    args = parser.parse_args()
    started = time.monotonic()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rhel-cvm-update-demo-"))
    root = work / "cvm"
    if root.exists():
        shutil.rmtree(root)
    can_unshare = os.geteuid() == 0 and shutil.which("unshare") is not None

    step(1, "build a sandbox confidential VM")
    say(f"""
        A real Azure CVM boots UEFI firmware -> shim -> a Unified Kernel Image (UKI), and its
        vTPM unlocks the LUKS2 root disk only if PCR4 (the digests of shim and the UKI) and
        PCR7 (Secure Boot state) are what they were when the key was sealed.  A new kernel
        changes PCR4, so without help the disk would not unlock after the update.

        The sandbox in {root} is built from real parts: Debian's signed shim and two UKIs
        (A and B) rebuilt byte for byte from ones that really booted under OVMF firmware;
        swtpm as the vTPM, into which the real event log of boot A is replayed; a copy of
        boot A's UEFI variables; and a LUKS2 image enrolled by systemd-cryptenroll against
        the PCRs of boot A (plus a recovery passphrase).  Only the firmware is simulated.
    """)
    try:
        cvm = sandbox.Sandbox(root)
        cvm.build()
    except sandbox.SandboxUnavailable as e:
        print(f"cannot build the sandbox on this machine: {e}\nrun `make setup` (as root) first.")
        return 2
    # keep_previous: 0 so that confirm visibly retires the old chain; the default (1) keeps one
    # older kernel's chain as a fallback.
    values = dict(cvm.config_values(), keep_previous=0)
    cvm.config_path.write_text("".join(f"{k}: {v!r}\n".replace("'", '"') for k, v in values.items()))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(work / "notify.sock")
    if os.path.exists(notify_path):
        os.unlink(notify_path)
    notify.bind(notify_path)
    notify.setblocking(False)
    try:
        print(f"  ESP: {cvm.esp}   UKIs: {', '.join(sorted(p.name for p in cvm.uki_dir.iterdir()))}")
        print(f"  vTPM: {cvm.swtpm.tcti}   LUKS2 image: {cvm.luks}")
        print(f"  PCR4={cvm.pcrs()[4].hex()}\n  PCR7={cvm.pcrs()[7].hex()}\n")
        say("This demo sets keep_previous: 0 in its config so that you can watch the old chain go; "
            "the default keeps one older kernel.")

        step(2, "status before the update")
        say("`status` answers without the TPM: what booted, which token matches it, what the next boot does.")
        cli(cvm, "status")

        step(3, "dnf installs a new kernel")
        uki_b = cvm.install_uki("b")
        say(f"""
            The kernel package drops UKI B into the ESP ({uki_b.name}).  On a real VM this
            change wakes rhel-cvm-update.path, which starts rhel-cvm-update.service.
        """)

        step(4, "the update service runs")
        say("""
            Exactly what the service runs: `rhel-cvm-update update --settle SECONDS`.  It waits
            until the ESP has been quiet (dnf writes several files), predicts next boot's PCR4
            and PCR7 from this boot's event log with UKI B swapped in (checked first against the
            live PCRs), seals a fresh key to that prediction as a new LUKS2 keyslot with a
            systemd-tpm2 token, and writes a Boot entry for shim + UKI B with BootNext pointing
            at it, so the old kernel stays the default until B has proven itself.  Each step is
            journaled under state_dir so a crash at any point is resumed or undone.
        """)
        before = set(tokens(cvm))
        update = cli(cvm, "update", "--settle", "2", service=True, notify_socket=notify_path)
        if update.returncode != 0:
            print("the update failed; see above")
            return 1
        print("  What systemd received on $NOTIFY_SOCKET (shown by `systemctl status`):")
        for message in drain(notify):
            print("    " + message.replace("\n", "  "))
        print()
        new_tokens = sorted(set(tokens(cvm)) - before)
        print(f"  New LUKS2 token(s): {new_tokens}\n")

        step(5, "status after the update")
        cli(cvm, "status")

        step(6, "reboot (SIMULATED FIRMWARE)")
        say("""
            SIMULATED FIRMWARE: the sandbox does what OVMF did when these UKIs really booted:
            it takes BootNext (and deletes it), starts shim and the UKI that entry names, and
            measures them into the vTPM -- here by replaying the real event log captured when
            UKI B booted under OVMF.
        """)
        booted = cvm.simulate_reboot()
        print(f"  booted {booted['entry']} -> {booted['uki']}  ({booted['log']})")
        print(f"  PCR4={cvm.pcrs()[4].hex()}\n  PCR7={cvm.pcrs()[7].hex()}\n")

        step(7, "does the disk unlock?")
        say("""
            systemd's own cryptsetup token plugin (what systemd-cryptsetup runs at boot) tries
            the TPM: it must unlock with the token sealed in step 4.
        """)
        if can_unshare:
            for token in new_tokens:
                ok = cvm.plugin_unlocks(token)
                print(f"  token {token}: " + ("UNLOCKED by systemd's plugin" if ok else "NOT unlocked"))
                if not ok:
                    return 1
        else:
            print("  (skipped: needs root and unshare to give the plugin the sandbox's vTPM)")
        print()

        step(8, "confirm after boot")
        say("""
            rhel-cvm-update-confirm.service runs after boot-complete.target: B booted through
            the staged entry with exactly the predicted PCRs, so B's entry moves to the front of
            BootOrder and shim's fallback BOOTX64.CSV, and the old chain is retired: its token
            and keyslot, and its Boot entry if this tool created it (A's entry here was made by
            the firmware capture, so it is listed but left alone).
        """)
        old_tokens = set(tokens(cvm)) - set(new_tokens)
        confirm = cli(cvm, "confirm", service=True, notify_socket=notify_path)
        drain(notify)
        if confirm.returncode != 0:
            return 1
        remaining = set(tokens(cvm))
        print(f"  tokens of the old chain {sorted(old_tokens)} -> still present: {sorted(old_tokens & remaining)}")
        cli(cvm, "status")
        if can_unshare:
            ok = all(cvm.plugin_unlocks(token) for token in new_tokens)
            print("  systemd's plugin after confirm, new token: " + ("UNLOCKED" if ok else "NOT unlocked"))
            if not ok:
                return 1
        print("  recovery passphrase still opens the disk: " + ("yes" if cvm.recovery_unlocks() else "NO"))
        print()
        say(f"""
            Done in {time.monotonic() - started:.0f} s.  On a real VM the same happens with the
            units in systemd/: rhel-cvm-update.path, rhel-cvm-update.service and
            rhel-cvm-update-confirm.service; `journalctl -t rhel-cvm-update` shows one entry per
            outcome.
        """)
        return 0
    finally:
        notify.close()
        cvm.close()
        if not args.keep:
            shutil.rmtree(work if not args.workdir else root, ignore_errors=True)
        else:
            print(f"sandbox kept in {root}")


if __name__ == "__main__":
    sys.exit(main())
