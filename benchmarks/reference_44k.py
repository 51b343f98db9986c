"""The whole 44.1 kHz reference set, medium and large generators included, with the time of each case.

The suite checks every case except the medium/large forwards (tests/test_reference_44k_check.py):
those two models are the small one's code at other widths and depths (their key manifests are checked
in the suite), and their float64 runs take minutes and ~9 GB on a laptop. This script runs all of
them, as ``selva check-reference DIR`` does, and prints one line per case with its wall time and
the peak resident memory of the process:

    .venv/bin/python benchmarks/reference_44k.py [--dir ../shared/reference-44k] [--cases GLOB,...]

Exit code 0 only when every output passed. Results go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selva.reference.check import check_directory  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(REPO.parent / "shared" / "reference-44k"))
    parser.add_argument("--cases", default="*", help="comma-separated shell patterns of case ids (default: all)")
    args = parser.parse_args()
    directory = Path(args.dir)
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    cases = json.loads((directory / "cases.json").read_text())["cases"]
    import fnmatch

    chosen = [c["id"] for c in cases if any(fnmatch.fnmatchcase(c["id"], p) for p in patterns)]
    failed, rows = 0, []
    start = time.perf_counter()
    for case_id in chosen:
        lines: list[str] = []
        t0 = time.perf_counter()
        code = check_directory(directory, out=lines.append, case_patterns=[case_id])
        seconds = time.perf_counter() - t0
        outputs = [line for line in lines if line.startswith(("PASS", "FAIL", "ERROR"))]
        bad = [line for line in outputs if not line.startswith("PASS")]
        failed += bool(code)
        rows.append((case_id, len(outputs) - len(bad), len(bad), seconds, peak_rss_gb()))
        print(f"{case_id:<36} {len(outputs) - len(bad):>3} passed {len(bad):>2} failed {seconds:>7.1f} s "
              f"peak RSS {peak_rss_gb():5.1f} GB", flush=True)
        for line in bad:
            print("   ", line)
    total = time.perf_counter() - start
    print(f"{len(chosen)} cases, {sum(r[1] for r in rows)} outputs passed, {sum(r[2] for r in rows)} failed, "
          f"{total:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
