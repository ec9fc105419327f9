"""Run every benchmark module (or the ones named on the command line) and print their figures."""
from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback

import tests.bench as pkg


def main(argv: list[str]) -> int:
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_")]
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    failed = []
    for name in sorted(names):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.monotonic()
        try:
            importlib.import_module(f"tests.bench.{name}").main()
        except Exception:  # one broken benchmark does not hide the others' figures
            traceback.print_exc()
            failed.append(name)
        print(f"--- {name}: {time.monotonic() - t0:.1f} s", flush=True)
    if failed:
        print(f"\nbenchmarks that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
