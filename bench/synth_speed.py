"""How long rendering training cases takes: seconds per case for a batch (issue: 100 cases < 10 min).

    python bench/synth_speed.py [--n 100] [--source oai] [--workers 2] [--mirror-fraction F] [--out DIR]

Prints wall time, seconds per case (wall / n) and the ratio to the 10-minute budget.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from OrthoKneeLib.progress import TextProgress  # noqa: E402
from OrthoKneeLib.synth import SynthConfig, synthesize  # noqa: E402
from OrthoKneeLib.synth.sources import SOURCES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--source", default="oai", choices=sorted(SOURCES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--mirror-fraction", type=float, default=0.0, help="share of cases drawn as the other knee")
    parser.add_argument("--out", type=Path, help="keep the cases here (default: a temporary folder)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="orthoknee-synth-bench-"))
    config = SynthConfig(source=args.source, n=args.n, seed=args.seed, mirror_fraction=args.mirror_fraction)
    start = time.perf_counter()
    manifest = synthesize(
        args.data / SOURCES[args.source].shared_folder,
        out,
        config,
        workers=args.workers,
        progress=TextProgress("synth", unit="case"),
    )
    wall = time.perf_counter() - start
    rendered = manifest["rendered_now"]
    print(
        f"source={args.source} cases={rendered} workers={args.workers} cpus={os.cpu_count()} "
        f"mirror_fraction={args.mirror_fraction:g}"
    )
    print(
        f"wall {wall:.1f} s, {wall / max(rendered, 1):.2f} s/case (wall), "
        f"{manifest['seconds_per_case'] or 0:.2f} s/case per worker"
    )
    budget = 600.0 * rendered / 100.0
    print(f"budget for {rendered} cases: {budget:.0f} s -> ratio {wall / budget:.2f} (<= 1.00 meets it)")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
