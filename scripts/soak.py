"""The long soak: many SDK training clients (forward_backward / optim_step / save), SDK sampling clients and
streaming OpenAI clients against one `treadle serve` (tiny model) for minutes; prints ops, errors, hung
futures, p50/p99 latency per op and the server's RSS over time with its slope (see RELIABILITY.md).

    python scripts/soak.py --minutes 10 --trainers 32 --samplers 32 --openai 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.conftest import ServerProcess  # noqa: E402
from tests.e2e.reliability.soak import run_soak  # noqa: E402
from treadle.models.tiny import write_tiny_model  # noqa: E402

KEY = "tml-soak"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--trainers", type=int, default=32)
    p.add_argument("--samplers", type=int, default=32)
    p.add_argument("--openai", type=int, default=8, help="streaming OpenAI chat clients")
    p.add_argument("--out", default=None, help="JSON file for the report")
    args = p.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    root = Path(tempfile.mkdtemp(prefix="treadle-soak-"))
    model = write_tiny_model(root / "tiny", family="llama")
    server = ServerProcess(
        model, root / "data", "--api-key", KEY, "--max-runs-per-key", str(args.trainers + 8)
    )
    server.start()
    try:
        assert server.proc is not None
        report = run_soak(
            server.base_url,
            KEY,
            str(model),
            server.proc.pid,
            args.minutes * 60,
            args.trainers,
            args.samplers,
            args.openai,
            rss_every_s=5.0,
        )
    finally:
        server.stop()
    print(report.table())
    for e in report.errors[:20]:
        print("error:", e)
    if args.out:
        Path(args.out).write_text(
            json.dumps({**report.__dict__, "rss_slope_mb_per_min": report.rss_slope_mb_per_min})
        )
    return 1 if report.errors or report.hung else 0


if __name__ == "__main__":
    sys.exit(main())
