"""The `treadle` command: serve, chat, prepare, bench."""

from __future__ import annotations

import argparse
import importlib
import sys

from treadle.bench.registry import BENCHMARKS
from treadle.service.limits import Limits

# = treadle.models.embedded.DEFAULT_MODEL, repeated so `treadle --help` does not import torch
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


# Command groups that live beside the code they drive; each module has `register(subparsers)` and must
# import nothing heavy at module level (so `treadle --help` stays fast).
_COMMAND_MODULES: tuple[str, ...] = (
    "treadle.rl.cli",
    "treadle.learn.cli",
    "treadle.deploy_cli",
    "treadle.keys_cli",
)


def _serve(args: argparse.Namespace) -> int:
    from treadle.server import ServerConfig, serve

    cfg = ServerConfig.from_cli(args)
    serve(cfg)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from treadle.engine.engine import Engine

    engine = Engine(args.model, dtype=args.dtype, device=args.device)
    try:
        print(engine.chat([{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens))
    finally:
        engine.close()
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from treadle.models.loader import resolve_model_dir

    path = resolve_model_dir(args.model)
    print(f"{args.model} is ready at {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from treadle.bench.runner import run_benchmark

    return run_benchmark(args.which, model=args.model, out=args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treadle", description="Open, self-hosted post-training (Tinker + OpenAI APIs)."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the Tinker protocol and the OpenAI API over HTTP")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--data-dir", default=None, help="runs, checkpoints and the metadata DB (default: user cache)"
    )
    s.add_argument(
        "--db-url", default=None, help="SQLAlchemy URL of the metadata DB (default: SQLite in data dir)"
    )
    s.add_argument("--model", action="append", default=None, help="base model name or path (repeatable)")
    s.add_argument("--api-key", action="append", default=None, help="accepted API key (repeatable)")
    s.add_argument("--api-keys-file", default=None, help="file of 'key owner' lines")
    s.add_argument(
        "--deterministic", action="store_true", help="batch-invariant kernels: bitwise reproducible"
    )
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", default="cpu")
    s.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run each model's replicas as Ray actors; ADDRESS of a running cluster (ray://… or host:port), "
        "or none to start a local Ray runtime",
    )
    s.add_argument("--replicas", type=int, default=1, help="replicas of each model (needs --ray)")
    s.add_argument(
        "--shards",
        type=int,
        default=1,
        help="shard each model's blocks over N ranks with FSDP2 (gloo on CPU)",
    )
    s.add_argument(
        "--worker-memory-headroom-mb",
        type=float,
        default=None,
        help="cap each worker process's memory at its loaded size plus this: a request that needs more fails "
        "with an out-of-memory error and the worker keeps serving (default: no cap)",
    )
    s.add_argument(
        "--in-process",
        action="store_true",
        help="run the engines inside the server process (default: one worker process per model)",
    )
    s.add_argument(
        "--session-timeout", type=float, default=None, help="seconds without heartbeat before expiry"
    )
    s.add_argument(
        "--ephemeral-samplers",
        type=int,
        default=None,
        help="sampler snapshots (save_weights_and_get_sampling_client) kept in memory per run (default 4)",
    )
    s.add_argument(
        "--max-request-mb", type=float, default=None, help="largest request body accepted (default 256)"
    )
    s.add_argument(
        "--kv-cache-mb",
        type=float,
        default=None,
        help="per model: the sampler's KV cache grows no further; requests wait for room (default 2048)",
    )
    s.add_argument(
        "--no-prefix-retention",
        action="store_true",
        help="finished requests' KV is not kept for the next turn's prompt (multi-turn prefix cache off)",
    )
    Limits.add_arguments(s)  # backpressure limits and the body timeout (treadle.service.limits)
    s.add_argument(
        "--image-dir",
        default=None,
        help="directory whose files ImageAssetPointerChunk locations may name (default: none; no URLs ever)",
    )
    s.add_argument(
        "--trace-keep", type=int, default=None, help="deployment traces kept per deployment (default: all)"
    )
    s.add_argument(
        "--trace-max-age-days",
        type=float,
        default=None,
        help="delete deployment traces older than this (default: keep)",
    )
    s.set_defaults(func=_serve)

    c = sub.add_parser("chat", help="answer one chat prompt in-process (greedy)")
    c.add_argument("prompt")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=_chat)

    r = sub.add_parser("prepare", help="convert/locate a model once (the embedded default by default)")
    r.add_argument("--model", default=DEFAULT_MODEL)
    r.set_defaults(func=_prepare)

    b = sub.add_parser(
        "bench", help="benchmarks: each prints a table and writes JSON, as ratios to a baseline"
    )
    b.add_argument("which", choices=sorted(BENCHMARKS))
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--out", default="bench-results", help="directory for the JSON results")
    b.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    b.set_defaults(func=_bench)
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from treadle.errors import TreadleError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TreadleError as e:
        print(f"treadle: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
