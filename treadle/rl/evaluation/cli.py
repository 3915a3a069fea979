"""`treadle rl eval ENV --model BASE_OR_tinker://PATH --trials N --split test [--out DIR] [key=value ...]`.

Samples N independent trials of every task of the split from the model through the SDK, then prints pass^k and
pass@k for k = 1..N with bootstrap intervals and writes `eval.json` and `passk.png` to --out. The model is a
base model name or a `tinker://` sampler path (its base model, needed for the tokenizer, comes from the
server's REST API). Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_RENDERER = "qwen3_instruct"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def register_eval(rl_subparsers: argparse._SubParsersAction) -> None:  # pyright: ignore[reportPrivateUsage]
    """Add `eval` to the `treadle rl` command group."""
    p = rl_subparsers.add_parser(
        "eval",
        help="reliability: pass^k and pass@k over N trials per task of a split",
        description="Run N independent trials of every task of ENV's split against $TINKER_BASE_URL and report "
        "pass@1, pass@k and pass^k (all k trials succeed) for k = 1..N with bootstrap 95%% intervals. "
        "Extra key=value pairs are the env's own keys (e.g. level=1); `treadle envs show ENV` lists them.",
    )
    p.add_argument("env")
    p.add_argument("env_config", nargs="*", metavar="key=value")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model name or tinker:// sampler path")
    p.add_argument("--trials", type=_positive_int, default=4, help="independent trials per task (N)")
    p.add_argument("--split", default="test", help="dataset split (default test)")
    p.add_argument("--tasks", type=_positive_int, default=None, help="evaluate only the first N tasks")
    p.add_argument(
        "--out", default=None, help="directory for eval.json and passk.png (default rl-eval/ENV-TIME)"
    )
    p.add_argument("--renderer", default=DEFAULT_RENDERER)
    p.add_argument(
        "--max-tokens", type=_positive_int, default=None, help="tokens per turn (default: env limit)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--concurrency", type=_positive_int, default=16, help="task groups in flight")
    p.add_argument("--base-url", default=None, help="Tinker server (default $TINKER_BASE_URL)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap resampling seed")
    p.set_defaults(func=_run_eval)


def _parse_env_config(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        out[key] = value
    return out


def _run_eval(args: argparse.Namespace) -> int:
    from treadle.rl.envs.registry import UnknownEnvError, get_env

    try:
        if args.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        spec = get_env(args.env)
        if args.split not in spec.splits:
            raise ValueError(f"--split {args.split!r}: env {args.env!r} has splits {', '.join(spec.splits)}")
        env_config = spec.resolve_config(_parse_env_config(args.env_config))
    except (UnknownEnvError, ValueError) as e:
        print(f"treadle: error: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        # the cookbook 0.5.8 calls the SDK's *_async methods, which tinker 0.38 marks deprecated on every call
        warnings.simplefilter("ignore", FutureWarning)
        report = asyncio.run(evaluate(args, env_config))
    out = Path(args.out or os.path.join("rl-eval", f"{args.env}-{time.strftime('%Y%m%d-%H%M%S')}"))
    json_path, png_path = report.write(out)
    print(report.table())
    print(f"wrote {json_path} and {png_path}")
    return 0


async def _sampling_client_and_base(service: Any, model: str) -> tuple[Any, str]:
    if model.startswith("tinker://"):
        run = await service.create_rest_client().get_training_run_by_tinker_path_async(model)
        return service.create_sampling_client(model_path=model), str(run.base_model)
    return service.create_sampling_client(base_model=model), model


async def evaluate(args: argparse.Namespace, env_config: dict[str, Any]) -> Any:
    """Build the split's tasks, run the trials, score them (the report is returned, not written)."""
    import tinker
    from tinker_cookbook.completers import TinkerTokenCompleter
    from tinker_cookbook.renderers import get_renderer
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    from treadle.client_threads import limit_client_threads
    from treadle.rl.envs.dataset import build_split
    from treadle.rl.envs.registry import get_env
    from treadle.rl.evaluation.report import EvalReport
    from treadle.rl.evaluation.runner import run_trials

    limit_client_threads()
    spec = get_env(args.env)
    service = tinker.ServiceClient(base_url=args.base_url or os.environ.get("TINKER_BASE_URL"))
    sampler, base_model = await _sampling_client_and_base(service, args.model)
    renderer = get_renderer(args.renderer, get_tokenizer(base_model))
    # One group of N envs per task: the N trials of a task are rolled out together, as the server batches them.
    dataset = build_split(
        args.env, args.split, env_config, renderer, group_size=args.trials, batch_size=1, max_tasks=args.tasks
    )
    builders = [b for i in range(len(dataset)) for b in dataset.get_batch(i)]
    max_tokens = args.max_tokens or spec.limits.max_tokens_per_turn
    policy = TinkerTokenCompleter(sampler, max_tokens=max_tokens, temperature=args.temperature)
    results = await run_trials(builders, policy, trials=args.trials, concurrency=args.concurrency)
    trials = [t for r in results for t in r.trials]
    rewards = [t.reward for t in trials]
    stops = Counter(t.stop_reason or "episode_done" for t in trials)
    return EvalReport.from_outcomes(
        env=args.env,
        model=args.model,
        split=args.split,
        trials=args.trials,
        outcomes=[r.outcome() for r in results],
        mean_reward=sum(rewards) / len(rewards),
        settings={
            "env_config": env_config,
            "base_model": base_model,
            "renderer": args.renderer,
            "max_tokens": max_tokens,
            "temperature": args.temperature,
            "errored_trials": sum(t.error is not None for t in trials),
            "stop_reasons": dict(stops.most_common()),
            "first_errors": sorted({t.error for t in trials if t.error})[:5],
        },
        seed=args.seed,
    )
