"""TCG event log parse/replay/describe speed (``python -m benchmarks.tcglog``).

Three cases: every log of the shared corpus (what `eventlog` and `predict` do once per
run), the largest corpus log, and the worst input the parser accepts before refusing it
(MAX_EVENTS minimal records, about 3.8 MB).  Wall time is the best of REPEATS runs in this
process.  Goal: a real log in well under 50 ms, the worst case in under 2 s.
"""

import struct
import sys
import time
from pathlib import Path
from typing import Callable, List

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats import tcg_describe, tcglog

REPEATS = 5
REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "eventlog-corpus"


def best_of(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def full_pass(raw: bytes) -> None:
    log = tcglog.parse_event_log(raw)
    tcglog.replay(log)
    for event in log.events:
        tcg_describe.describe_event(event, log.uintn_size)


def worst_case() -> bytes:
    spec = (b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
            + struct.pack("<HH", 0x0004, 20) + b"\0")
    tiny = struct.pack("<IIIH20sI", 4, tcglog.EV_SEPARATOR, 1, 0x0004, bytes(20), 0)
    return (struct.pack("<II20sI", 0, tcglog.EV_NO_ACTION, bytes(20), len(spec)) + spec
            + tiny * (tcglog.MAX_EVENTS + 1))


def refuse(raw: bytes) -> None:
    try:
        tcglog.parse_event_log(raw)
    except FormatError:
        return
    raise AssertionError("the worst case was accepted")


def main() -> int:
    logs: List[bytes] = sorted((p.read_bytes() for p in CORPUS.glob("*/*.bin")), key=len)
    if logs:
        total = best_of(lambda: [full_pass(raw) for raw in logs])
        largest = best_of(lambda: full_pass(logs[-1]))
        print(f"corpus: {len(logs)} logs, {sum(map(len, logs)) / 1024:.0f} KiB: "
              f"{total * 1000:.1f} ms for parse+replay+describe of all "
              f"({total / len(logs) * 1000:.2f} ms per log)")
        print(f"largest log ({len(logs[-1]) / 1024:.0f} KiB): {largest * 1000:.1f} ms")
    else:
        print(f"corpus not found at {CORPUS}: skipped")
    hostile = worst_case()
    worst = best_of(lambda: refuse(hostile))
    print(f"worst case ({len(hostile) / 1e6:.1f} MB, {tcglog.MAX_EVENTS + 1} records): "
          f"refused in {worst * 1000:.0f} ms")
    return 0 if worst < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
