import importlib
import sys

from benchmarks import BENCHMARKS


def main(argv):
    selected = argv or list(BENCHMARKS)
    unknown = [name for name in selected if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    status = 0
    for name in selected:
        print(f"== {name}")
        status |= importlib.import_module(f"benchmarks.{name}").main()
    return status


sys.exit(main(sys.argv[1:]))
