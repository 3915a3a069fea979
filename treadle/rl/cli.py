"""`treadle envs list|show NAME` and `treadle rl train ENV [key=value ...]` (plus `rl eval` when present)."""

from __future__ import annotations

import argparse
import importlib.util
import sys


def _envs_list(args: argparse.Namespace) -> int:
    from treadle.rl.envs.registry import env_names, load_manifest

    for name in env_names():
        m = load_manifest(name)
        print(f"{name:<18} {m['version']:<8} {m['description'].split('.')[0]}")
    return 0


def _envs_show(args: argparse.Namespace) -> int:
    from treadle.rl.envs.registry import UnknownEnvError, format_manifest, load_manifest

    try:
        print(format_manifest(load_manifest(args.name)))
    except UnknownEnvError as e:
        print(f"treadle: error: {e}", file=sys.stderr)
        return 2
    return 0


def _rl_train(args: argparse.Namespace) -> int:
    from treadle.client_threads import limit_client_threads

    # before torch loads (the cookbook imports it): this client's torch work is small, the server's cores matter
    limit_client_threads()
    from treadle.rl.envs.registry import UnknownEnvError
    from treadle.rl.training import build_config, parse_overrides

    try:
        overrides = parse_overrides(args.overrides)
        config = build_config(args.env, overrides)
    except (UnknownEnvError, ValueError) as e:
        print(f"treadle: error: {e}", file=sys.stderr)
        return 2
    import asyncio

    from tinker_cookbook.rl import train

    asyncio.run(train.main(config))
    print(f"done: metrics in {config.log_path}/metrics.jsonl")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # pyright: ignore[reportPrivateUsage]
    envs = subparsers.add_parser("envs", help="RL environments: list them, show a manifest")
    envs_sub = envs.add_subparsers(dest="envs_command", required=True)
    envs_sub.add_parser("list", help="registered environments").set_defaults(func=_envs_list)
    show = envs_sub.add_parser("show", help="an environment's manifest")
    show.add_argument("name")
    show.set_defaults(func=_envs_show)

    rl = subparsers.add_parser("rl", help="agentic RL on a Tinker server (treadle.rl)")
    rl_sub = rl.add_subparsers(dest="rl_command", required=True)
    tr = rl_sub.add_parser(
        "train",
        help="train ENV with the cookbook's rl.train",
        description="Train ENV against $TINKER_BASE_URL. Keys: model_name, renderer_name, learning_rate, "
        "max_steps, group_size, groups_per_batch, lora_rank, loss_fn, ..., plus the env's own (e.g. level); "
        "`treadle envs show ENV` lists those.",
    )
    tr.add_argument("env")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.set_defaults(func=_rl_train)
    if importlib.util.find_spec("treadle.rl.evaluation.cli") is not None:
        from treadle.rl.evaluation.cli import register_eval

        register_eval(rl_sub)
