"""The online learner: deployment traces + feedback → candidate adapter → gate → promote / reject / roll back.

Client side only (the official tinker SDK for training, plain HTTP for deployments and traces). The only calls
that change what is served are `promote` (after a candidate passed the gate) and `rollback` (after a promoted
version's live reward fell below its predecessor's); a crash or a failed candidate leaves the deployment as it
was. Every decision is appended, with its numbers, to the state file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tinker
from tinker import types

from treadle.errors import UserError
from treadle.learn.batch import Batch, Labeled, Trace, build_batch, feedback_signal, staleness
from treadle.learn.config import LearnConfig
from treadle.learn.gate import end_of_turn_ids, gate_passes, gate_score, load_gate_set
from treadle.learn.rest import DeploymentsClient, Json
from treadle.learn.rewards import make_reward_fn
from treadle.learn.state import Decision, ModelInfo, Watch, load_state, save_state
from treadle.learn.traces import TraceStream


class Learner:
    def __init__(
        self,
        cfg: LearnConfig,
        *,
        rest: DeploymentsClient | None = None,
        service: tinker.ServiceClient | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.rest = rest or DeploymentsClient(cfg.base_url, cfg.api_key)
        self.service = service or tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key)
        self.log = log
        self.path: Path = cfg.resolved_state_file()
        self.state = load_state(self.path, cfg.deployment)
        self.reward_fn = make_reward_fn(cfg.reward, cfg.base_url, cfg.api_key)
        self.stream = TraceStream(
            self.rest,
            cfg.deployment,
            cursor=self.state.cursor,
            consumed=set(self.state.consumed),
            feedback_wait_s=cfg.feedback_wait_s,
            hand_out_unrated=cfg.reward != "feedback",
        )
        self.training: Any = None
        self.tokenizer: Any = None
        self.eot_ids: list[int] = []
        self.gate_datums: list[types.Datum] = []
        self.trained_from = ""  # model path whose training state the client holds (plus this cycle's steps)
        self._ready: list[Trace] = []

    # setup
    def start(self) -> Decision:
        dep = self.rest.get_deployment(self.cfg.deployment)
        self.training = self.service.create_lora_training_client(
            base_model=dep["base_model"], rank=self.cfg.lora_rank
        ).result()
        self.tokenizer = self.training.get_tokenizer()
        self.eot_ids = end_of_turn_ids(self.tokenizer)
        if self.cfg.gate_set:
            self.gate_datums = load_gate_set(
                Path(self.cfg.gate_set).expanduser(), self.tokenizer, self.eot_ids
            )
        live = str(dep["model_path"])
        info = self.state.models.get(live)
        if info is None:
            if self.cfg.init_state:
                self._load(self.cfg.init_state)
            elif live.startswith("tinker://"):
                raise UserError(
                    f"init_state: deployment {self.cfg.deployment!r} serves {live}, which this learner did not "
                    "produce; pass init_state=tinker://RUN/weights/NAME (its training checkpoint)",
                    field="init_state",
                )
            # a restore point, so a rejected candidate can always go back to exactly the live weights
            saved = self.training.save_state(f"{self.cfg.deployment}-start").result().path
            info = self.state.models[live] = ModelInfo(step=0, state_path=saved, gate=None)
            self.state.step = 0
        else:
            self._restore(live)
        self.trained_from = live
        if self.gate_datums and info.gate is None:
            info.gate = gate_score(self.training, self.gate_datums)
        d = self.state.log(
            Decision(
                cycle=self.state.cycle,
                kind="start",
                reason=f"learning for {self.cfg.deployment} from version {dep['version']}",
                numbers={"gate": info.gate, "step": self.state.step},
                version=int(dep["version"]),
                model_path=live,
            )
        )
        self._save()
        self.log(f"learn: start at version {dep['version']} ({live}), gate={info.gate}")
        return d

    def _load(self, state_path: str) -> None:
        # a fresh training client from the checkpoint (weights + Adam state): the SDK's supported way back
        self.training = self.service.create_training_client_from_state_with_optimizer(state_path).result()

    def _restore(self, model_path: str) -> None:
        info = self.state.models[model_path]
        if info.state_path is None:
            raise UserError(
                f"init_state: no training checkpoint recorded for {model_path}", field="init_state"
            )
        self._load(info.state_path)
        self.state.step = info.step
        self.trained_from = model_path

    def _save(self) -> None:
        self.state.cursor = self.stream.cursor
        self.state.consumed = sorted(self.stream.consumed)
        save_state(self.path, self.state)

    # one cycle
    def run_cycle(self) -> Decision:
        """Collect traces, maybe roll back a promotion on probation, train, gate, promote or reject."""
        st = self.state
        st.cycle += 1
        dep = self.rest.get_deployment(self.cfg.deployment)
        if str(dep["model_path"]) != self.trained_from:
            if str(dep["model_path"]) not in st.models:
                raise UserError(
                    f"deployment {self.cfg.deployment!r} now serves {dep['model_path']}, which this learner did "
                    "not produce; restart it with init_state=tinker://RUN/weights/NAME",
                    field="deployment",
                )
            self._restore(str(dep["model_path"]))
        labeled = self._collect()
        rolled = self._check_probation(dep)
        if rolled is not None:
            self._save()
            return rolled
        if not labeled:
            return self._decide("skip", "no new traces with feedback", {"unrated": self.stream.unrated})
        batch = build_batch(
            labeled,
            lambda text: list(self.tokenizer.encode(text, add_special_tokens=False)),
            self.eot_ids,
            use_rewards=self.cfg.use_rewards,
            use_corrections=self.cfg.use_corrections,
            max_staleness=self.cfg.max_staleness,
        )
        if not batch.rl and not batch.sft:
            return self._decide(
                "skip", "no training signal (no corrections, all advantages zero)", batch.stats
            )
        return self._train_and_gate(dep, batch)

    def _collect(self) -> list[Labeled]:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.cycle_timeout_s if cfg.cycle_timeout_s > 0 else None
        while len(self._ready) < cfg.min_traces:
            self._ready.extend(self.stream.poll())
            if len(self._ready) >= cfg.min_traces or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(cfg.poll_interval_s)
        taken, self._ready = self._ready[: cfg.max_traces], self._ready[cfg.max_traces :]
        steps = {path: info.step for path, info in self.state.models.items()}
        out: list[Labeled] = []
        for trace in taken:
            reward = self.reward_fn(trace)
            _, correction = feedback_signal(trace)
            if reward is not None:
                self.state.add_reward(int(trace["version"]), reward)
            out.append(Labeled(trace, reward, correction, staleness(trace, steps, self.state.step)))
        return out

    def _check_probation(self, dep: Json) -> Decision | None:
        w = self.state.watch
        if w is None:
            return None
        if int(dep["version"]) != w.version:  # someone else moved the deployment: nothing to judge
            self.state.watch = None
            return None
        n_new, new = self.state.mean_reward(w.version)
        n_old, old = self.state.mean_reward(w.previous_version)
        if n_new < self.cfg.rollback_min_feedback or new is None or old is None:
            return None
        numbers: dict[str, float | int | str | None] = {
            "live_reward": new,
            "live_n": n_new,
            "previous_reward": old,
            "previous_n": n_old,
            "margin": self.cfg.rollback_margin,
        }
        self.state.watch = None
        if new >= old - self.cfg.rollback_margin:
            self.state.log(
                Decision(self.state.cycle, "keep", f"version {w.version} holds up live", numbers, w.version)
            )
            return None
        reason = (
            f"rollback: live reward of version {w.version} {new:.3f} < version {w.previous_version}'s "
            f"{old:.3f} - {self.cfg.rollback_margin}"
        )
        after = self.rest.rollback(self.cfg.deployment, w.previous_version, reason)
        self._restore(w.previous_model_path)
        self.log(f"learn: {reason}")
        return self.state.log(
            Decision(
                self.state.cycle, "rollback", reason, numbers, int(after["version"]), w.previous_model_path
            )
        )

    def _train(self, batch: Batch) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for _ in range(self.cfg.steps_per_cycle):
            futures = []
            if batch.rl:
                futures.append(("rl", self.training.forward_backward(batch.rl, self.cfg.loss)))
            if batch.sft:
                futures.append(("sft", self.training.forward_backward(batch.sft, "cross_entropy")))
            optim = self.training.optim_step(types.AdamParams(learning_rate=self.cfg.learning_rate))
            for name, fut in futures:
                for key, value in fut.result().metrics.items():
                    metrics[f"{name}_{key}"] = float(value)
            optim.result()
            self.state.step += 1
        return metrics

    def _train_and_gate(self, dep: Json, batch: Batch) -> Decision:
        st = self.state
        live = str(dep["model_path"])
        metrics = self._train(batch)
        name = f"{self.cfg.deployment}-c{st.cycle}-s{st.step}"
        sampler_path = self.training.save_weights_for_sampler(name).result().path
        state_path = self.training.save_state(name).result().path
        live_gate = st.models[live].gate
        cand_gate = gate_score(self.training, self.gate_datums) if self.gate_datums else None
        numbers: dict[str, float | int | str | None] = {**batch.stats, **metrics, "step": st.step}
        numbers.update({"gate": cand_gate, "live_gate": live_gate, "tolerance": self.cfg.gate_tolerance})
        # recorded before promoting, so a crash right after the promotion still knows what is live
        st.models[sampler_path] = ModelInfo(step=st.step, state_path=state_path, gate=cand_gate)
        if (
            cand_gate is not None
            and live_gate is not None
            and not gate_passes(cand_gate, live_gate, self.cfg.gate_tolerance)
        ):
            reason = f"gate {cand_gate:.4f} < live {live_gate:.4f} - {self.cfg.gate_tolerance}"
            self._restore(live)
            return self._decide("reject", reason, numbers, model_path=sampler_path)
        self._save()
        gate_txt = "no gate set" if cand_gate is None else f"gate {cand_gate:.4f} vs live {live_gate:.4f}"
        after = self.rest.promote(self.cfg.deployment, sampler_path, f"learn cycle {st.cycle}: {gate_txt}")
        st.watch = Watch(int(after["version"]), int(dep["version"]), live)
        self.trained_from = sampler_path
        return self._decide(
            "promote", gate_txt, numbers, version=int(after["version"]), model_path=sampler_path
        )

    def _decide(
        self,
        kind: str,
        reason: str,
        numbers: dict[str, Any],
        *,
        version: int | None = None,
        model_path: str | None = None,
    ) -> Decision:
        d = self.state.log(Decision(self.state.cycle, kind, reason, dict(numbers), version, model_path))
        self._save()
        nums = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.numbers.items())
        self.log(
            f"learn: cycle {d.cycle} {kind}{'' if version is None else f' -> v{version}'}: {reason} [{nums}]"
        )
        return d

    def run(self) -> None:
        """`start`, then cycles until `cfg.cycles` (0: forever). A failing cycle is logged and retried; it has
        changed nothing that is served, and the training weights go back to the live version's."""
        self.start()
        done = 0
        while self.cfg.cycles == 0 or done < self.cfg.cycles:
            try:
                self.run_cycle()
            except UserError:
                raise
            except Exception as e:  # a server hiccup: log it, restore the live weights, try again
                self._decide("error", f"{type(e).__name__}: {e}", {})
                try:
                    self._restore(self.trained_from)
                except Exception as e2:  # noqa: BLE001 - reported, and the next cycle re-syncs
                    self.log(f"learn: could not restore training weights: {e2}")
                time.sleep(self.cfg.poll_interval_s)
            done += 1
