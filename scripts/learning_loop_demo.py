"""The learning-loop demonstration (issue 14 §5): simulated users with a hidden preference talk to a deployment
through the `openai` client and rate answers through `POST /v1/feedback`; the online learner turns their
feedback into gated, promoted versions; the users' mean reward per round is recorded for several seeds.

Against a running server (`treadle serve --data-dir DIR`, default model):

    python scripts/learning_loop_demo.py --base-url http://127.0.0.1:8000 --seeds 0 1 2 \
        --out results/deployed-loop.json --plot results/deployed-loop.png

Each round: `--requests` user requests served by the live version (all rated), then one learner cycle on
exactly those traces (train → gate → promote or reject). Round 0 is served by the base deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from treadle.learn.config import LearnConfig
from treadle.learn.learner import Learner
from treadle.learn.rest import DeploymentsClient
from treadle.learn.simulate import Interaction, UserPopulation, mean_reward

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GATE_SET = Path(__file__).with_name("learning_loop_gate.jsonl")


def _round_record(r: int, inter: list[Interaction], secs: float) -> dict[str, Any]:
    return {
        "round": r,
        "versions": sorted({i.version for i in inter}),
        "mean_reward": mean_reward(inter),
        "mean_words": statistics.fmean(i.words for i in inter),
        "finished_frac": sum(i.finish_reason == "stop" for i in inter) / len(inter),
        "corrections": sum(i.corrected for i in inter),
        "serve_s": secs,
        "examples": [{"q": i.question, "a": i.answer, "reward": i.reward} for i in inter[:3]],
    }


@contextlib.contextmanager
def _one_learner_at_a_time(state_dir: Path) -> Iterator[None]:
    """Seeds run as parallel processes share one CPU server: their serving rounds overlap, but one learner
    cycle at a time keeps the server's peak training memory to one batch (big-vocabulary logits)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "cycle.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_seed(args: argparse.Namespace, seed: int, state_dir: Path) -> dict[str, Any]:
    name = f"loop-s{seed}-{uuid.uuid4().hex[:6]}"
    rest = DeploymentsClient(args.base_url, args.api_key)
    rest.create_deployment(name, args.model)
    users = UserPopulation(
        args.base_url,
        args.api_key,
        name,
        seed=seed,
        max_words=args.max_words,
        correction_rate=args.correction_rate,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
    )
    cfg = LearnConfig(
        deployment=name,
        base_url=args.base_url,
        api_key=args.api_key,
        state_file=str(state_dir / f"{name}.json"),
        min_traces=args.requests,
        max_traces=args.requests,
        feedback_wait_s=5.0,
        poll_interval_s=0.5,
        cycle_timeout_s=60.0,
        gate_set=str(args.gate_set),
        gate_tolerance=args.gate_tolerance,
        learning_rate=args.learning_rate,
        steps_per_cycle=args.steps_per_cycle,
        loss=args.loss,
        rollback_min_feedback=args.requests // 2,
    )
    learner = Learner(cfg, log=lambda msg: print(f"[seed {seed}] {msg}", flush=True))
    learner.start()
    rounds: list[dict[str, Any]] = []
    t_seed = time.monotonic()
    for r in range(args.rounds + 1):
        t0 = time.monotonic()
        rec = _round_record(r, users.round(args.requests), time.monotonic() - t0)
        if r < args.rounds:
            t1 = time.monotonic()
            with _one_learner_at_a_time(state_dir):
                d = learner.run_cycle()
            rec["decision"] = {"kind": d.kind, "version": d.version, "reason": d.reason, **d.numbers}
            rec["learn_s"] = time.monotonic() - t1
        print(
            f"[seed {seed}] round {r}: versions {rec['versions']} reward {rec['mean_reward']:.3f} "
            f"words {rec['mean_words']:.1f} finished {rec['finished_frac']:.2f} "
            f"-> {rec.get('decision', {}).get('kind', '-')}",
            flush=True,
        )
        rounds.append(rec)
        if args.out:  # after every round, so a stopped run still leaves its rounds
            partial = {"seed": seed, "deployment": name, "rounds": rounds, "partial": True}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"config": _jsonable(args), "runs": [partial]}, indent=1))
    users.close()
    rest.close()
    return {"seed": seed, "deployment": name, "rounds": rounds, "seconds": time.monotonic() - t_seed}


def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def summarize(runs: list[dict[str, Any]], last: int) -> dict[str, Any]:
    base = [run["rounds"][0]["mean_reward"] for run in runs]
    final = [statistics.fmean(r["mean_reward"] for r in run["rounds"][-last:]) for run in runs]
    gates = [
        (r["decision"]["gate"], r["decision"]["live_gate"])
        for run in runs
        for r in run["rounds"]
        if r.get("decision", {}).get("kind") in ("promote", "reject")
    ]

    def spread(xs: list[float]) -> dict[str, float]:
        return {
            "mean": statistics.fmean(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs),
            "max": max(xs),
        }

    return {
        "base_reward": spread(base),
        f"final_reward_last{last}": spread(final),
        "promotions": sum(
            r.get("decision", {}).get("kind") == "promote" for run in runs for r in run["rounds"]
        ),
        "rejections": sum(
            r.get("decision", {}).get("kind") == "reject" for run in runs for r in run["rounds"]
        ),
        "rollbacks": sum(
            r.get("decision", {}).get("kind") == "rollback" for run in runs for r in run["rounds"]
        ),
        "worst_gate_drop": max(
            (live - cand for cand, live in gates if cand is not None and live is not None), default=None
        ),
    }


def plot(runs: list[dict[str, Any]], path: Path, tolerance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(11, 4))
    n = min(len(run["rounds"]) for run in runs)
    for run in runs:
        ax.plot([r["mean_reward"] for r in run["rounds"]], alpha=0.4, marker="o", label=f"seed {run['seed']}")
    mean = [statistics.fmean(run["rounds"][i]["mean_reward"] for run in runs) for i in range(n)]
    ax.plot(mean, color="black", linewidth=2.5, label="mean over seeds")
    ax.axhline(mean[0], color="gray", linestyle="--", label="base deployment (round 0)")
    ax.set_xlabel("round (one learner cycle between rounds)")
    ax.set_ylabel("users' mean reward (hidden preference)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("users' reward per round")
    for run in runs:
        xs, drops = [], []
        for r in run["rounds"]:
            d = r.get("decision", {})
            if d.get("gate") is not None and d.get("live_gate") is not None:
                xs.append(r["round"] + 1)
                drops.append(d["gate"] - d["live_gate"])
        gx.plot(xs, drops, marker="o", alpha=0.6, label=f"seed {run['seed']}")
    gx.axhline(-tolerance, color="red", linestyle="--", label=f"-tolerance ({tolerance})")
    gx.axhline(0, color="gray", linewidth=0.8)
    gx.set_xlabel("cycle")
    gx.set_ylabel("candidate − live gate score (nats/token)")
    gx.set_title("gate: candidate vs live version")
    gx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="tml-local")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=5, help="learner cycles (rounds served = rounds + 1)")
    p.add_argument("--requests", type=int, default=24, help="user requests per round")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--max-words", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--correction-rate", type=float, default=0.5)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--steps-per-cycle", type=int, default=2)
    p.add_argument("--loss", default="importance_sampling")
    p.add_argument("--gate-set", type=Path, default=GATE_SET)
    p.add_argument("--gate-tolerance", type=float, default=0.1)
    p.add_argument("--last", type=int, default=2, help="final reward = mean of the last N rounds")
    p.add_argument("--out", type=Path, default=Path("results/deployed-loop.json"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument(
        "--state-dir", type=Path, default=Path("/tmp/deployed-loop-state"), help="learner state files"
    )
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="only combine these result files (seeds run in parallel)",
    )
    args = p.parse_args()
    if args.merge:
        merged = [json.loads(f.read_text()) for f in args.merge]
        runs = [run for m in merged for run in m["runs"]]
        out = {"config": merged[0]["config"], "summary": summarize(runs, args.last), "runs": runs}
        args.out.write_text(json.dumps(out, indent=1))
        print(json.dumps(out["summary"], indent=1))
        if args.plot:
            plot(runs, args.plot, args.gate_tolerance)
        return
    state_dir = args.state_dir
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, seed, state_dir))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = summarize(runs, args.last)
        args.out.write_text(
            json.dumps({"config": _jsonable(args), "summary": summary, "runs": runs}, indent=1)
        )
    print(json.dumps(summarize(runs, args.last), indent=1))
    if args.plot:
        plot(runs, args.plot, args.gate_tolerance)


if __name__ == "__main__":
    main()
