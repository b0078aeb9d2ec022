"""A full `reseal` on swtpm next to `systemd-cryptenroll` enrolling the same image.

Both add one TPM2 keyslot + systemd-tpm2 token bound to PCR 4+7 of a fresh copy of the
same 20 MiB LUKS2 image (pbkdf2, 1000 iterations for the existing slot), talking to the
same swtpm.  `reseal` runs as the CLI a user runs (Python start-up included) with the
passphrase on stdin and --pcr values equal to the current PCRs (cryptenroll 252 can only
bind to current values); it also re-reads the header, verifies the new token and
test-opens the new keyslot, which cryptenroll does not.  A third line times the same
`reseal()` call in-process, which separates the work from Python start-up and imports.
Reported: median and best of REPEATS wall times, and the ratios.  Run:
``python -m benchmarks.reseal``.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, List

from rhel_cvm_update.adapters.cryptsetup import Cryptsetup
from rhel_cvm_update.adapters.tpm import Tpm
from rhel_cvm_update.config import config_from_mapping
from rhel_cvm_update.reseal import reseal
from rhel_cvm_update.secrets import Secret
from tests.swtpm_fixtures import TEST_PASSPHRASE, Swtpm, make_luks2_image, missing_tools

REPEATS = 7


def _time(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _check(result: subprocess.CompletedProcess) -> None:
    if result.returncode:
        raise RuntimeError(f"{' '.join(result.args)} exited {result.returncode}: {result.stderr.decode()}")


def main() -> int:
    missing = missing_tools(["swtpm", "swtpm_ioctl", "tpm2_pcrread", "cryptsetup", "systemd-cryptenroll"])
    if missing:
        print(f"reseal benchmark skipped: not installed: {', '.join(missing)}")
        return 0
    work = tempfile.mkdtemp(prefix="bench-reseal-")
    swtpm = Swtpm(os.path.join(work, "tpm"))
    swtpm.start()
    try:
        template = make_luks2_image(os.path.join(work, "template.img"))
        pcr_args: List[str] = []
        for pcr, value in sorted(swtpm.read_sha256([4, 7]).items()):
            pcr_args += ["--pcr", f"{pcr}={value.hex()}"]
        config = os.path.join(work, "config.yaml")

        def ours() -> None:
            image = os.path.join(work, "ours.img")
            shutil.copyfile(template, image)
            with open(config, "w") as f:
                f.write(f"tpm: '{swtpm.tcti}'\nluks_device: {image}\nstate_dir: {work}/state\n")
            _check(subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", config, "reseal",
                                   "--key-file", "-", *pcr_args], input=TEST_PASSPHRASE, capture_output=True))

        def theirs() -> None:
            image = os.path.join(work, "theirs.img")
            shutil.copyfile(template, image)
            _check(subprocess.run(["systemd-cryptenroll", f"--tpm2-device={swtpm.tcti}", "--tpm2-pcrs=4+7", image],
                                  env=dict(os.environ, PASSWORD=TEST_PASSPHRASE.decode()), capture_output=True))

        def in_process() -> None:
            image = os.path.join(work, "inproc.img")
            shutil.copyfile(template, image)
            settings = config_from_mapping({"tpm": swtpm.tcti, "luks_device": image, "state_dir": f"{work}/state"})
            with Tpm(swtpm.tcti) as tpm, Secret(bytearray(TEST_PASSPHRASE)) as key:
                reseal(settings, Cryptsetup(image), tpm, pcr_values=values, key=key)

        values = swtpm.read_sha256([4, 7])
        ours_times, theirs_times, inproc_times = [], [], []
        for _ in range(REPEATS):
            ours_times.append(_time(ours))
            theirs_times.append(_time(theirs))
            inproc_times.append(_time(in_process))
            swtpm.flush_all()
    finally:
        swtpm.stop()
        shutil.rmtree(work, ignore_errors=True)
    for name, times in (("rhel-cvm-update reseal", ours_times), ("reseal() in-process", inproc_times),
                        ("systemd-cryptenroll", theirs_times)):
        print(f"{name:24s} median {statistics.median(times) * 1000:7.1f} ms   best {min(times) * 1000:7.1f} ms")
    for name, times in (("reseal", ours_times), ("reseal() in-process", inproc_times)):
        print(f"ratio {name}/cryptenroll: median {statistics.median(times) / statistics.median(theirs_times):.2f}"
              f"   best {min(times) / min(theirs_times):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
