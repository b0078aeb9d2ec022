"""How ``update`` time grows with the UKIs and Boot entries already on the machine.

Sandbox CVM (tests/sandbox.py), booted into captured UKI A.  Each case prepares the machine,
installs one new UKI (a variant of A with another command line: same size, new digest),
snapshots the mutable state and times ``run_update()`` in this process REPEATS times, each
from the snapshot.  Every timed update adds exactly one token (chains sealed earlier may be
reported as reused); what varies is what it must look at besides:

* UKIs present: 1 (A only), 5 and 20 (A plus variants); detect hashes every UKI, so the
  cost should grow by one image hash per UKI.  update seals only the keep_previous + 1 newest
  new UKIs (a default 16 KiB LUKS2 header is full after about ten tokens), so the token count
  stays the same in every case;
* Boot entries: 1 (the captured Boot0007), 10 and 30 (byte copies of the real Boot0007 under
  other numbers, all in BootOrder), which the boot manager reads and orders.

Growth is at most linear when the cost per extra item does not rise with the count: printed
as the ratio to the smallest case next to the count ratio, and as the marginal milliseconds
per extra item between consecutive cases.  Run: ``python -m benchmarks.growth``.
"""

import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from benchmarks.update import restore, snapshot, timed

REPEATS = 5
UKI_COUNTS = (1, 5, 20)
ENTRY_COUNTS = (1, 10, 30)
CAPTURED_ENTRY = 0x0007
FOREIGN_FIRST = 0x0100


def add_foreign_entries(cvm, count: int) -> None:
    """``count`` copies of the firmware-written Boot0007, appended to BootOrder."""
    from tests.sandbox import EFI_GLOBAL, read_u16_var, write_var

    raw = (cvm.efivars / ("Boot%04X-%s" % (CAPTURED_ENTRY, EFI_GLOBAL))).read_bytes()
    numbers = [FOREIGN_FIRST + i for i in range(count)]
    for number in numbers:
        (cvm.efivars / ("Boot%04X-%s" % (number, EFI_GLOBAL))).write_bytes(raw)
    order = (read_u16_var(cvm.efivars, "BootOrder") or []) + numbers
    write_var(cvm.efivars, "BootOrder", b"".join(n.to_bytes(2, "little") for n in order))


def measure_case(work: Path, name: str, prepare: Callable[[object], None]) -> List[float]:
    from rhel_cvm_update.transaction import run_update
    from tests.sandbox import sandbox_cvm

    with sandbox_cvm(work / name) as cvm:
        prepare(cvm)
        cvm.install_uki("c")
        snap = snapshot(cvm, work / (name + "-snapshot"))
        times = []
        for _ in range(REPEATS):
            restore(cvm, snap)
            result = None

            def update() -> None:
                nonlocal result
                result = run_update(cvm.config())

            times.append(timed(update))
            added = [s for s in result.sealed if s["action"] == "added"]
            if len(added) != 1:
                raise RuntimeError(f"{name}: the timed update added {len(added)} tokens, expected 1")
            cvm.swtpm.flush_all()
    shutil.rmtree(work / name, ignore_errors=True)
    shutil.rmtree(work / (name + "-snapshot"), ignore_errors=True)
    return times


def with_ukis(count: int) -> Callable[[object], None]:
    def prepare(cvm) -> None:
        from rhel_cvm_update.transaction import run_update

        for i in range(count - 1):
            cvm.install_uki("v%02d" % i)
        if count > 1:
            config = cvm.config()
            added = [s for s in run_update(config).sealed if s["action"] == "added"]
            if len(added) != min(count - 1, config.keep_previous + 1):
                raise RuntimeError(f"preparing {count} UKIs added {len(added)} tokens")
            cvm.swtpm.flush_all()
    return prepare


def with_entries(count: int) -> Callable[[object], None]:
    return lambda cvm: add_foreign_entries(cvm, count - 1)


def report(title: str, counts: Tuple[int, ...], times: Dict[int, List[float]]) -> None:
    """Ratios and marginal costs use the best run: on a shared machine the others include
    waiting for other processes."""
    print(title)
    base = counts[0]
    best = {count: min(times[count]) for count in counts}
    for count in counts:
        print(f"  {count:3d}: best {best[count] * 1000:8.1f} ms   median {statistics.median(times[count]) * 1000:8.1f} ms"
              f"   best ratio to {base}: {best[count] / best[base]:5.2f} (count ratio {count / base:.0f})")
    for low, high in zip(counts, counts[1:]):
        print(f"  marginal {low}->{high}: {(best[high] - best[low]) / (high - low) * 1000:7.1f} ms per extra item")


def main() -> int:
    from tests.sandbox import SandboxUnavailable

    work = Path(tempfile.mkdtemp(prefix="bench-growth-"))
    try:
        ukis, entries = {}, {}
        try:
            for count in UKI_COUNTS:
                ukis[count] = measure_case(work, f"ukis-{count}", with_ukis(count))
            for count in ENTRY_COUNTS:
                entries[count] = measure_case(work, f"entries-{count}", with_entries(count))
        except SandboxUnavailable as e:
            print(f"growth benchmark skipped: {e}")
            return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"run_update() sealing one new UKI, {REPEATS} runs per case")
    report("UKIs present on the ESP:", UKI_COUNTS, ukis)
    report("Boot entries in efivarfs:", ENTRY_COUNTS, entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
