"""A full ``update`` with a 100 MiB UKI on the sandbox CVM, next to ``systemd-cryptenroll``
enrolling the same LUKS2 image on the same swtpm.

The sandbox (tests/sandbox.py) is booted into captured UKI A with a token from
systemd-cryptenroll.  A ~100 MiB UKI (the Authenticode benchmark's: systemd stub, Debian
kernel, random initrd) is installed in uki_dir, and each run starts from the same snapshot
of the mutable state (LUKS2 image, efivarfs copy, ESP, state directory).  ``update`` then
does everything a kernel update needs: reads efivarfs, the LUKS2 header and the event log,
replays and checks the log against the live PCRs, hashes shim and the new UKI (and its
kernel), predicts PCR4/PCR7, unseals the current token, seals a new secret, adds a keyslot
and token and verifies them, writes the Boot entry, BootNext and BOOTX64.CSV.
systemd-cryptenroll only seals to the PCRs as they are now and adds a keyslot (its
passphrase in $PASSWORD): the floor for "add a TPM2 keyslot".

Reported: median and best of REPEATS wall times for the CLI (Python start-up included),
for ``run_update()`` in this process, and for cryptenroll; the ratios.  cryptenroll never
reads the UKI, while any correct update must hash all of it at least once (Authenticode for
PCR4), so the peer is cryptenroll + ``openssl dgst -sha256`` of the UKI, the floor of the work
an update cannot skip.  Goal: the CLI within 1.3x of that peer.
Run: ``python -m benchmarks.update``.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

REPEATS = 5
GOAL_RATIO = 1.3
MUTABLE = ("luks.img", "efivars", "state", "esp")


def snapshot(cvm, where: Path) -> Path:
    where.mkdir(parents=True)
    for name in MUTABLE:
        source = cvm.root / name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, where / name)
    return where


def restore(cvm, snap: Path) -> None:
    for name in MUTABLE:
        target = cvm.root / name
        if target.is_dir():
            shutil.rmtree(target)
            shutil.copytree(snap / name, target)
        else:
            shutil.copyfile(snap / name, target)


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def summary(name: str, times: List[float]) -> str:
    return f"{name:30s} median {statistics.median(times) * 1000:8.1f} ms   best {min(times) * 1000:8.1f} ms"


def run_cli_update(cvm, env: Dict[str, str]) -> Dict[str, object]:
    import json

    result = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(cvm.config_path), "update",
                             "--no-wait", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600,
                            env=env)
    if result.returncode:
        raise RuntimeError(f"update exited {result.returncode}: {result.stderr.decode()}")
    return json.loads(result.stdout)


def main() -> int:
    from benchmarks.authenticode import bench_uki
    from rhel_cvm_update.transaction import run_update
    from tests.sandbox import RECOVERY_PASSPHRASE, SandboxUnavailable, sandbox_cvm

    work = Path(tempfile.mkdtemp(prefix="bench-update-"))
    try:
        try:
            context = sandbox_cvm(work / "cvm")
            cvm = context.__enter__()
        except SandboxUnavailable as e:
            print(f"update benchmark skipped: {e}")
            return 0
        try:
            big = cvm.uki_dir / "uki-big.efi"
            shutil.copyfile(bench_uki(), big)
            size = big.stat().st_size
            snap = snapshot(cvm, work / "snapshot")
            enroll_copy = work / "enroll.img"

            # The CLI runs with byte-code, as the RPM installs the package (this development
            # environment may set PYTHONDONTWRITEBYTECODE); the first run writes it.
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
            restore(cvm, snap)
            run_cli_update(cvm, env)

            def ours_cli() -> None:
                result = run_cli_update(cvm, env)
                if [s["uki"] for s in result["sealed"]] != [str(big)]:
                    raise RuntimeError(f"update did not seal exactly the big UKI: {result}")

            def ours_in_process() -> None:
                result = run_update(cvm.config())
                if len(result.sealed) != 1:
                    raise RuntimeError(f"update did not seal one chain: {result}")

            def theirs() -> None:
                result = subprocess.run(["systemd-cryptenroll", f"--tpm2-device={cvm.swtpm.tcti}", "--tpm2-pcrs=4+7",
                                         str(enroll_copy)], env=dict(os.environ, PASSWORD=RECOVERY_PASSPHRASE.decode()),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
                if result.returncode:
                    raise RuntimeError(f"systemd-cryptenroll failed: {result.stderr.decode()}")

            def one_hash_pass() -> None:
                subprocess.run(["openssl", "dgst", "-sha256", str(big)], check=True, stdout=subprocess.DEVNULL)

            cli_times, inproc_times, theirs_times, hash_times = [], [], [], []
            for _ in range(REPEATS):
                restore(cvm, snap)
                cli_times.append(timed(ours_cli))
                restore(cvm, snap)
                inproc_times.append(timed(ours_in_process))
                shutil.copyfile(snap / "luks.img", enroll_copy)
                theirs_times.append(timed(theirs))
                hash_times.append(timed(one_hash_pass))
                cvm.swtpm.flush_all()
        finally:
            context.__exit__(None, None, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"UKI: {size / (1 << 20):.1f} MiB; {REPEATS} runs each, every run from the same snapshot")
    print(summary("rhel-cvm-update update (CLI)", cli_times))
    print(summary("run_update() in-process", inproc_times))
    print(summary("systemd-cryptenroll", theirs_times))
    print(summary("openssl dgst -sha256 of the UKI", hash_times))
    floor = [t + h for t, h in zip(theirs_times, hash_times)]
    print(summary("cryptenroll + openssl (peer)", floor))
    for name, times in (("update CLI", cli_times), ("run_update()", inproc_times)):
        print(f"ratio {name}/cryptenroll: median {statistics.median(times) / statistics.median(theirs_times):.2f}")
        ratio = statistics.median(times) / statistics.median(floor)
        print(f"ratio {name}/(cryptenroll + openssl dgst of the UKI): median {ratio:.2f}   best "
              f"{min(times) / min(floor):.2f}   goal <= {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
