"""Batch throughput: cases per minute through ``orthoknee predict --batch``, in this process
and on a Dask LocalCluster of 1 and 2 workers.

    python bench/batch_speed.py [--cases N] [--bundle B]

Makes N copies of the shipped sample case (three series) in a temporary folder, predicts them
each way and prints cases per minute against the budget: a cohort the size of the OAI (4,796
subjects) in three days on one 2-core machine, 1.11 cases per minute.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUDGET_CASES_PER_MIN = 4796 / (3 * 24 * 60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4, help="copies of the sample case (default 4)")
    parser.add_argument("--bundle", type=Path)
    args = parser.parse_args(argv)

    from OrthoKneeLib.batch import BatchOptions, run_batch
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cases"
        for n in range(args.cases):
            (root / f"case-{n:03d}").mkdir(parents=True)
            for plane, name in SAMPLE_VIEWS.items():
                shutil.copy(sample_case_dir() / name, root / f"case-{n:03d}" / f"{plane}.nrrd")
        options = BatchOptions(bundle=str(args.bundle) if args.bundle else None, device="cpu", montage=True)
        print(f"{args.cases} copies of the sample case; budget {BUDGET_CASES_PER_MIN:.2f} cases/min")
        for label, workers in (("in process", None), ("Dask, 1 worker", 1), ("Dask, 2 workers", 2)):
            start = time.perf_counter()
            rows = run_batch(root, Path(tmp) / f"out-{workers}", options, workers=workers)
            seconds = time.perf_counter() - start
            failed = [r for r in rows if r["status"] != "done"]
            rate = 60 * len(rows) / seconds
            print(
                f"{label:16} {seconds:7.1f} s  {rate:5.2f} cases/min = {rate / BUDGET_CASES_PER_MIN:.2f} x budget"
                + (f"  ({len(failed)} not done)" if failed else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
