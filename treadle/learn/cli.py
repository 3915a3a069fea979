"""`treadle learn --deployment NAME [key=value ...]` (the online learner) and `treadle learn status`."""

from __future__ import annotations

import argparse
from typing import Any


def _learn(args: argparse.Namespace) -> int:
    from treadle.learn.config import parse_config

    words, deployment = _split_deployment(list(args.config), args.deployment)
    if words and words[0] == "status":
        return _status(words[1:], deployment)
    cfg = parse_config(words, deployment=deployment)
    from treadle.client_threads import limit_client_threads

    limit_client_threads()  # before the learner loads torch: leave the cores to the server it trains on
    from treadle.learn.learner import Learner

    learner = Learner(cfg)
    try:
        learner.run()
    except KeyboardInterrupt:
        print(f"learn: stopped; state kept in {learner.path}")
    return 0


def _split_deployment(words: list[str], deployment: str | None) -> tuple[list[str], str | None]:
    """`--deployment NAME` may also come after `status` or among the key=value words."""
    rest: list[str] = []
    it = iter(words)
    for w in it:
        if w == "--deployment":
            deployment = next(it, None)
        elif w.startswith("--deployment="):
            deployment = w.split("=", 1)[1]
        else:
            rest.append(w)
    return rest, deployment


def _status(words: list[str], deployment: str | None) -> int:
    from treadle.errors import UserError
    from treadle.learn.config import parse_config
    from treadle.learn.state import format_status, load_state

    cfg = parse_config(words, deployment=deployment)
    path = cfg.resolved_state_file()
    if not path.exists():
        raise UserError(f"deployment: no learner state for {cfg.deployment!r} at {path}", field="deployment")
    print(format_status(load_state(path, cfg.deployment)))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "learn",
        help="online learner: deployment traces + feedback -> gated, promoted adapter versions",
        description=(
            "treadle learn --deployment NAME [key=value ...] runs the learner; "
            "treadle learn status --deployment NAME [state_file=...] prints its decisions. "
            "Keys: fields of treadle.learn.config.LearnConfig (e.g. min_traces=16 gate_set=eval.jsonl)."
        ),
    )
    p.add_argument("--deployment", default=None, help="the deployment to learn for")
    p.add_argument("config", nargs=argparse.REMAINDER, help="'status', or key=value settings")
    p.set_defaults(func=_learn)
