"""Speed and memory measurements (``python -m benchmarks`` from the repository root).

Not tests: numbers depend on the machine.  Each module in BENCHMARKS has ``main() -> int``.
"""

BENCHMARKS = ("authenticode", "tcglog", "reseal", "status", "update", "growth", "hooks")
