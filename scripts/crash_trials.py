"""Crash trials, the long run: `kill -9` a real `treadle serve` (tiny model) and its client at random moments
during training, sampling and checkpoint saves/publishes/exports/deletes, restart on the same data, check that
nothing was lost (see tests/e2e/reliability/crash.py), and print the figures RELIABILITY.md records.

    python scripts/crash_trials.py --trials 100                      # SQLite
    python scripts/crash_trials.py --trials 100 --db-url postgresql+psycopg://...   # PostgreSQL
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.reliability.crash import crash_server, run_trial  # noqa: E402
from treadle.models.tiny import write_tiny_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: SQLite in the data dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting trials after this long")
    p.add_argument("--out", default=None, help="JSON file for the per-trial results")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="treadle-crash-"))
    model = write_tiny_model(root / "tiny", family="llama")
    server = crash_server(model, root / "data", args.db_url)
    server.start(timeout_s=600)
    rng = random.Random(args.seed)
    resume = None
    results = []
    t0 = time.monotonic()
    try:
        for trial in range(args.trials):
            if args.max_minutes is not None and time.monotonic() - t0 > args.max_minutes * 60:
                break
            result, resume = run_trial(server, trial, rng, resume)
            results.append(dataclasses.asdict(result))
            status = "ok" if not result.problems else f"PROBLEMS {result.problems[:3]}"
            print(
                f"trial {trial}: killed {result.seconds_before_kill:.1f}s after the first save; "
                f"{result.requests_in_flight} requests sent ({result.resolved_ok} ok, "
                f"{result.resolved_server_errors} server errors), {result.saves_completed} saves completed, "
                f"{result.checkpoints_listed} listed: {status}",
                flush=True,
            )
    finally:
        server.stop()
    bad = [r for r in results if r["problems"]]
    summary = {
        "db": "postgresql" if args.db_url else "sqlite",
        "trials": len(results),
        "trials_with_problems": len(bad),
        "requests_sent": sum(r["requests_in_flight"] for r in results),
        "resolved_ok": sum(r["resolved_ok"] for r in results),
        "resolved_server_error": sum(r["resolved_server_errors"] for r in results),
        "checkpoints_checked": sum(r["checkpoints_listed"] for r in results),
        "minutes": round((time.monotonic() - t0) / 60, 1),
    }
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "trials": results}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
