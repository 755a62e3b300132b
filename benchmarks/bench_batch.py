"""A batch of 100,000 files: how long load() and start() take.

Every step runs in a fresh process (no warm caches of alma's), on a batch written by
one glob, ``data/*.txt``:

- ``load()``: parse the experiment, expand the glob, check every file, import the run
  module, open the state (targets: about 1.5 s);
- ``start()``, first time: the state file is created and the 100,000 instances are
  registered in it;
- ``start()``, resumed: the same after a pause, with everything registered already
  (target: 0.3 s);

``start()`` is timed until it returns (runs go on in the background), then the
experiment is paused. Run: ``python benchmarks/bench_batch.py [--files N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = """
import json, sys, time
t0 = time.perf_counter()
import alma.experiment
t1 = time.perf_counter()
d = alma.experiment.load(sys.argv[1])
t2 = time.perf_counter()
d.start()
t3 = time.perf_counter()
d.stop()
d.close()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "start": t3 - t2}))
"""


def write_batch(folder: Path, files: int) -> Path:
    data = folder / "data"
    data.mkdir()
    for i in range(files):
        (data / f"f{i:06d}.txt").write_text("x")
    (folder / "big.batch").write_text(json.dumps({"instances": ["data/*.txt"]}))
    (folder / "big.py").write_text(
        "import time\n\ndef run(instance, save_callback, state):\n    time.sleep(0.01)\n"
    )
    exp = folder / "big.experiment"
    exp.write_text(json.dumps({"load": "big.py", "batch": "big.batch", "iterations": 3}))
    return exp


def step(exp: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", STEP, str(exp)], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"alma batch benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        exp = write_batch(Path(tmp), args.files)
        first = step(exp)
        resumed = [step(exp) for _ in range(args.rounds)]
    best = {k: min(r[k] for r in resumed) for k in ("import", "load", "start")}
    print(f"{args.files:,} files")
    print(f"  first load() {first['load']:.2f} s, first start() {first['start']:.2f} s")
    print(
        f"  resumed, best of {args.rounds}: load() {best['load']:.2f} s, "
        f"start() {best['start']:.2f} s (import alma {best['import']:.2f} s)"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
