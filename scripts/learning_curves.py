"""Learning curves for treadle.rl envs: train each env for a bounded time per seed through `treadle serve`, with
the cookbook evaluating the TEST split periodically, then plot mean and spread over seeds.

    python scripts/learning_curves.py run ENV --seeds 0 1 2 --out results/curves/ENV [key=value ...]
    python scripts/learning_curves.py plot results/curves/ENV [results/curves/ENV2 ...] --png results/x.png

`run` starts one `treadle serve` (the default model unless --model), then runs `treadle rl train ENV ...` once
per seed as a subprocess (at most --parallel at a time, each killed after --time-limit-min; the metrics it
logged so far are kept). `seed=S` is the env's generation/shuffle seed, so each seed is an independent
replicate. The exact command of every run is written to `commands.txt` in the output directory. `plot` reads
every run's `metrics.jsonl` (`test/env/all/reward/total`, and `test/env/all/correct` when the env reports it),
writes the PNG and a `summary.json` per env directory with the per-step mean, min and max over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treadle.rl.async_bench import API_KEY, serve_subprocess  # noqa: E402 - after the path fix above

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEST_KEYS = ("test/env/all/reward/total", "test/env/all/correct")


def _train_cmd(env: str, seed: int, log_path: Path, base_url: str, model: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "treadle.cli",
        "rl",
        "train",
        env,
        f"seed={seed}",
        f"log_path={log_path}",
        f"base_url={base_url}",
        f"model_name={model}",
        *extra,
    ]


def _run_all(args: argparse.Namespace, base_url: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TINKER_API_KEY": API_KEY, "TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1"}
    env.setdefault(
        "OMP_NUM_THREADS", "1"
    )  # the client's own torch work is small; leave the cores to the server
    pending = list(args.seeds)
    running: list[tuple[int, subprocess.Popen[bytes], float]] = []
    with open(out / "commands.txt", "a") as commands:
        while pending or running:
            while pending and len(running) < args.parallel:
                seed = pending.pop(0)
                log_path = out / f"seed{seed}"
                cmd = _train_cmd(args.env, seed, log_path, base_url, args.model, args.overrides)
                shown = ["treadle", *cmd[3:]]
                commands.write(" ".join(shlex.quote(c) for c in shown) + "\n")
                commands.flush()
                log_path.mkdir(parents=True, exist_ok=True)
                with open(log_path / "train.out", "wb") as log:
                    proc = subprocess.Popen(
                        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                running.append((seed, proc, time.monotonic()))
                print(f"started {args.env} seed {seed}: {log_path}", flush=True)
            time.sleep(2)
            for item in list(running):
                seed, proc, t0 = item
                elapsed = time.monotonic() - t0
                if proc.poll() is None and elapsed > args.time_limit_min * 60:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()
                    print(
                        f"{args.env} seed {seed}: stopped at the time limit ({elapsed / 60:.1f} min)",
                        flush=True,
                    )
                if proc.poll() is not None:
                    print(
                        f"{args.env} seed {seed}: exit {proc.returncode} after {elapsed / 60:.1f} min",
                        flush=True,
                    )
                    (out / f"seed{seed}" / "wall_s.txt").write_text(f"{elapsed:.1f}\n")
                    running.remove(item)


def cmd_run(args: argparse.Namespace) -> int:
    if args.base_url:
        _run_all(args, args.base_url)
        return 0
    server_env = {**os.environ, "TINKER_TELEMETRY": "0"}
    with serve_subprocess(args.model, server_env) as url:
        _run_all(args, url)
    return 0


def _read_runs(env_dir: Path) -> dict[str, list[dict[str, Any]]]:
    runs = {}
    for metrics in sorted(env_dir.glob("seed*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        runs[metrics.parent.name] = rows
    return runs


def summarize(env_dir: Path) -> dict[str, Any]:
    """Per test-eval step: mean, min, max over seeds of each test key (steps every seed reached)."""
    runs = _read_runs(env_dir)
    if not runs:
        raise SystemExit(f"no seed*/metrics.jsonl under {env_dir}")
    per_seed: dict[str, dict[str, dict[int, float]]] = {}
    for seed, rows in runs.items():
        per_seed[seed] = {k: {int(r["step"]): float(r[k]) for r in rows if k in r} for k in TEST_KEYS}
    curves: dict[str, Any] = {}
    for key in TEST_KEYS:
        step_sets = [set(s[key]) for s in per_seed.values() if s[key]]
        if not step_sets:
            continue
        steps = sorted(set.intersection(*step_sets))
        values = [[per_seed[s][key][st] for s in per_seed if per_seed[s][key]] for st in steps]
        curves[key] = {
            "steps": steps,
            "mean": [sum(v) / len(v) for v in values],
            "min": [min(v) for v in values],
            "max": [max(v) for v in values],
            "per_seed": {s: [per_seed[s][key][st] for st in steps] for s in per_seed if per_seed[s][key]},
        }
    # pass@1 from the rollouts themselves: the fraction of test episodes that ended solved (`correct` or
    # `solved` = 1 in any step), over every test episode of that eval (not only those that answered)
    pass_at_1: dict[str, list[tuple[int, float]]] = {}
    for s in runs:
        pts = []
        for f in sorted((env_dir / s).glob("iteration_*/eval_test_rollout_summaries.jsonl")):
            trajs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            if not trajs:
                continue
            ok = [
                any(st["metrics"].get(k) == 1.0 for st in t["steps"] for k in ("correct", "solved"))
                for t in trajs
            ]
            pts.append((int(trajs[0]["iteration"]), sum(ok) / len(ok)))
        pass_at_1[s] = pts
    test_all_steps = {
        s: [(int(r["step"]), float(r[TEST_KEYS[0]])) for r in rows if TEST_KEYS[0] in r]
        for s, rows in runs.items()
    }
    train = {
        s: [(int(r["step"]), r["env/all/reward/total"]) for r in rows if "env/all/reward/total" in r]
        for s, rows in runs.items()
    }
    wall = {
        s: (env_dir / s / "wall_s.txt").read_text().strip()
        for s in runs
        if (env_dir / s / "wall_s.txt").exists()
    }
    summary = {
        "env_dir": str(env_dir),
        "seeds": sorted(runs),
        "test": curves,
        "test_all_steps": test_all_steps,
        "test_pass_at_1": pass_at_1,
        "train_reward": train,
        "wall_s": wall,
    }
    (env_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [summarize(Path(d)) for d in args.env_dirs]
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.2 * len(summaries), 3.8), dpi=120, squeeze=False)
    for ax, summary in zip(axes[0], summaries, strict=True):
        # The test reward only: the cookbook averages an env metric such as `correct` over the episodes that
        # report it (those that answered), so it is not a pass rate; it stays in summary.json.
        key = TEST_KEYS[0]
        c = summary["test"].get(key)
        if c is not None:
            ax.plot(c["steps"], c["mean"], "-o", label=f"test reward, mean of {len(c['per_seed'])} seeds")
            ax.fill_between(c["steps"], c["min"], c["max"], alpha=0.2, label="min–max over seeds")
        common = sorted(set.intersection(*[{p[0] for p in v} for v in summary["test_pass_at_1"].values()]))
        if common:
            by_seed = [dict(v) for v in summary["test_pass_at_1"].values()]
            mean = [sum(d[st] for d in by_seed) / len(by_seed) for st in common]
            ax.plot(common, mean, "--s", label="test pass@1 (solved), mean of seeds")
        for seed, pts in sorted(summary["test_all_steps"].items()):
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], ":", lw=1, alpha=0.7, label=f"{seed} (every eval)"
            )
        ax.set_title(Path(summary["env_dir"]).name, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("test split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)
    print(f"wrote {args.png}")
    for s in summaries:
        for key, c in s["test"].items():
            pts = ", ".join(
                f"{st}: {m:.3f} [{lo:.3f}, {hi:.3f}]"
                for st, m, lo, hi in zip(c["steps"], c["mean"], c["min"], c["max"], strict=True)
            )
            print(f"{Path(s['env_dir']).name} {key}: {pts}")
        for seed, p1 in s["test_pass_at_1"].items():
            print(
                f"{Path(s['env_dir']).name} {seed} test pass@1: "
                + ", ".join(f"{st}: {v:.3f}" for st, v in p1)
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train ENV once per seed against treadle serve")
    r.add_argument("env")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="passed to `treadle rl train`")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", required=True)
    r.add_argument("--model", default=DEFAULT_MODEL)
    r.add_argument("--base-url", default=None, help="use this server instead of starting one")
    r.add_argument("--parallel", type=int, default=2)
    r.add_argument("--time-limit-min", type=float, default=10.0)
    r.set_defaults(func=cmd_run)
    pl = sub.add_parser("plot", help="mean and spread of the test-split curves over seeds")
    pl.add_argument("env_dirs", nargs="+")
    pl.add_argument("--png", required=True)
    pl.set_defaults(func=cmd_plot)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
