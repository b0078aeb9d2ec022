"""Cold start of ``rhel-cvm-update status`` in a sandbox CVM, next to ``python -c pass``.

The sandbox (tests/sandbox.py: captured shim + UKI A, efivarfs copy, swtpm with boot A's log
replayed, a systemd-cryptenroll'd LUKS2 image) gives status real work: efivarfs, the
LUKS2 header through cryptsetup, the event log, the shim's digest.  Each run is a new
process, as an admin or a monitoring probe would start it.

Two settings: with byte-code caches (what an installed RPM has: compiled .pyc files; here
written once to a private PYTHONPYCACHEPREFIX by a warm-up run) and without (this
development environment sets PYTHONDONTWRITEBYTECODE, so every module is compiled on every
start).  The peer is ``python -c pass`` in the same virtualenv and setting: the floor of any
Python tool.  ``-X importtime`` then names the slowest imports.  Goal: status under 200 ms
with byte-code, both on the sandbox CVM and in a configuration whose LUKS image, shim, event
log and efivarfs are all missing (status then reports errors, and must not get slower doing
so).  Run: ``python -m benchmarks.status``.
"""

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

REPEATS = 15
GOAL_SECONDS = 0.200
REPO = Path(__file__).resolve().parents[1]


def _times(argv: Sequence[str], env: Dict[str, str], ok: Sequence[int] = (0, 1)) -> Tuple[List[float], List[float]]:
    """Wall and CPU (user + system, children included) seconds of each of REPEATS runs.  On a
    shared machine the wall time waits for other processes; the CPU time does not."""
    walls, cpus = [], []
    for _ in range(REPEATS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if result.returncode not in ok:  # 1: status asks for attention, 2: errors reported; still full runs
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode()}")
    return walls, cpus


def slowest_imports(argv: Sequence[str], env: Dict[str, str], top: int = 8) -> List[Tuple[int, str]]:
    """(cumulative microseconds, module) of the slowest top-level-ish imports."""
    result = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        # Only first- and second-level entries (indent 1 or 3): deeper ones are inside them.
        if len(name) - len(name.lstrip()) <= 3:
            rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    from tests.sandbox import SandboxUnavailable, sandbox_cvm

    work = Path(tempfile.mkdtemp(prefix="bench-status-"))
    try:
        try:
            cvm_context = sandbox_cvm(work / "cvm")
            cvm = cvm_context.__enter__()
        except SandboxUnavailable as e:
            print(f"status benchmark skipped: {e}")
            return 0
        try:
            status = [sys.executable, "-m", "rhel_cvm_update", "--config", str(cvm.config_path), "status", "--json"]
            missing = work / "missing"
            (missing / "state").mkdir(parents=True, mode=0o700)
            (missing / "config.yaml").write_text(
                f"luks_device: {missing / 'absent.img'}\nesp: {missing / 'esp'}\nuki_dir: {missing / 'esp/EFI/Linux'}\n"
                f"efivars: {missing / 'efivars'}\nevent_log: {missing / 'absent.log'}\nstate_dir: {missing / 'state'}\n")
            status_missing = [sys.executable, "-m", "rhel_cvm_update", "--config", str(missing / "config.yaml"),
                              "status", "--json"]
            floor = [sys.executable, "-c", "pass"]
            base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
            settings = {
                "with byte-code": dict(base, PYTHONPYCACHEPREFIX=str(work / "pycache")),
                "without byte-code": dict(base, PYTHONDONTWRITEBYTECODE="1"),
            }
            results = {}
            for label, env in settings.items():
                _times(status, env)  # warm-up: page cache, and the .pyc files for "with byte-code"
                results[label] = (_times(status, env), _times(floor, env))
            _times(status_missing, settings["with byte-code"], ok=(2,))
            results["files missing, with byte-code"] = (_times(status_missing, settings["with byte-code"], ok=(2,)),
                                                         _times(floor, settings["with byte-code"]))
            imports = slowest_imports(status, settings["with byte-code"])
        finally:
            cvm_context.__exit__(None, None, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ms(values: List[float]) -> str:
        return f"median {statistics.median(values) * 1000:6.1f} ms   best {min(values) * 1000:6.1f} ms"

    for label, ((ours, ours_cpu), (peer, peer_cpu)) in results.items():
        print(f"{label}:")
        print(f"  rhel-cvm-update status  wall {ms(ours)}   CPU {ms(ours_cpu)}")
        print(f"  python -c pass          wall {ms(peer)}   CPU {ms(peer_cpu)}")
        print(f"  ratio status/python: wall median {statistics.median(ours) / statistics.median(peer):.2f}, "
              f"best {min(ours) / min(peer):.2f}; status minus python start-up (best): "
              f"{(min(ours) - min(peer)) * 1000:.1f} ms")
    print("slowest imports of status (with byte-code, cumulative):")
    for micros, name in imports:
        print(f"  {micros / 1000:6.1f} ms  {name}")
    for label in ("with byte-code", "files missing, with byte-code"):
        walls = results[label][0][0]
        median = statistics.median(walls)
        print(f"goal: status under {GOAL_SECONDS * 1000:.0f} ms ({label}): median {median * 1000:.1f} ms "
              f"({'met' if median < GOAL_SECONDS else 'NOT met'}), best {min(walls) * 1000:.1f} ms")
    print(f"load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
