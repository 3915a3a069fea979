"""Training ops on a loaded model: create it, describe it, and run forward_backward, optim_step and
in-memory sampler snapshots in seq_id order on its worker."""

from __future__ import annotations

import logging
from typing import Any

from treadle.engine import validate
from treadle.engine.types import AdamParams, ForwardBackwardRequest, LoraConfig
from treadle.engine.worker import Worker
from treadle.errors import ConflictError, TreadleError, require
from treadle.service import paths
from treadle.service.custom_losses import CustomLosses
from treadle.service.results import ModelCreated, ModelInfo, Optimized, SamplerSnapshot
from treadle.service.state import LoadedModel, LoadedSampler, ServiceState
from treadle.store import SamplerRow

log = logging.getLogger(__name__)


class Training:
    def __init__(self, state: ServiceState, custom_losses: CustomLosses) -> None:
        self.s = state
        self._custom_losses = custom_losses  # loss_fn "custom" names one of the session's uploaded losses

    def create_model(
        self,
        owner: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora: LoraConfig,
        user_metadata: dict[str, Any],
    ) -> tuple[str, str]:
        s = self.s
        s.admit_run(owner)
        s.active_session(owner, session_id)
        worker = s.pool.place(base_model)
        lora.validate(worker.info.max_lora_rank)
        mid = paths.model_id(session_id, model_seq_id)

        def call() -> ModelCreated:
            if s.store.get_run(mid) is not None:
                raise ConflictError(f"model_seq_id: model {mid!r} already exists", field="model_seq_id")
            worker.create_adapter(mid, lora)
            s.register_model(owner, session_id, mid, worker, lora, user_metadata)
            return ModelCreated(mid)

        rid = s.submit(
            owner,
            "create_model",
            f"create:{mid}",
            lambda r: worker.submit_call(mid, None, call, s.done(r)),
        )
        return rid, mid

    def get_info(self, owner: str, model_id: str) -> ModelInfo:
        run = self.s.run(owner, model_id)
        info = self.s.pool.get(run.base_model).info
        return ModelInfo(
            model_id, info.arch, info.model_name, info.tokenizer_dir, run.lora_config.get("rank")
        )

    def forward_backward(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        req: ForwardBackwardRequest,
        custom_config: dict[str, float | str] | None = None,
    ) -> str:
        """`custom_config`: loss_fn 'custom''s config (its loss_id), resolved here to the session's uploaded loss."""
        s = self.s
        if req.loss_fn == "custom":
            req.custom_loss = self._custom_losses.resolve(owner, model_id, custom_config or {})
        model = s.model(owner, model_id)
        require(isinstance(seq_id, int) and seq_id >= 1, "seq_id", f"must be an integer ≥ 1, got {seq_id!r}")
        req.adapter_id = model_id
        model.worker.prepare_forward_backward(req)  # bad images: a 400 now, not a failed future
        info = model.worker.info  # bad data (token ids, lengths, loss inputs): also a 400, before any future
        validate.forward_backward_data(req, info.vocab_size, info.max_context_length)
        s.touch(model)
        return s.submit(
            owner,
            "forward_backward",
            f"op:{model_id}:{seq_id}",
            lambda r: model.worker.submit_fb(model_id, seq_id, req, s.done(r)),
        )

    def optim_step(self, owner: str, model_id: str, seq_id: int, params: AdamParams) -> str:
        params.validate()
        return self.s.ordered(
            owner,
            model_id,
            seq_id,
            "optim_step",
            lambda m: Optimized(m.worker.optim_step(model_id, params)),
        )

    def save_for_sampler_ephemeral(self, owner: str, model_id: str, seq_id: int, sampling_seq_id: int) -> str:
        s = self.s
        model = s.model(owner, model_id)
        sid = paths.sampler_id(model.session_id, sampling_seq_id)

        def call(m: LoadedModel) -> SamplerSnapshot:
            m.worker.snapshot_adapter(model_id, sid)
            copies = _copy_to_replicas(m.worker, s.pool.replicas(m.worker.name), sid)
            s.store.add_sampler(SamplerRow(sid, m.session_id, owner, m.worker.name, None, "snapshot"))
            s.samplers[sid] = LoadedSampler(m.worker, sid, copies)
            m.ephemeral.append(sid)
            # Snapshots are in-memory copies made every RL step; keep the few recent ones an off-policy
            # loop may still sample from.
            while len(m.ephemeral) > s.cfg.ephemeral_samplers_per_model:
                old = m.ephemeral.popleft()
                s.samplers.pop(old, None)
                for w in [m.worker, *copies]:
                    if w.has_adapter(old):
                        w.remove_adapter(old)
            return SamplerSnapshot(sid)

        return s.ordered(owner, model_id, seq_id, "save_weights_for_sampler", call)


def _copy_to_replicas(home: Worker, replicas: list[Worker], adapter_id: str) -> list[Worker]:
    """Copy a snapshot from the run's replica to the others that can take it (Ray: through the object store);
    returns those that have it. A replica that fails to take it is skipped: it just does not serve that one."""
    others = [w for w in replicas if w is not home and w.moves_adapters and home.moves_adapters]
    if not others:
        return []
    handle = home.export_adapter(adapter_id)
    copies = []
    for w in others:
        try:
            w.import_adapter(adapter_id, handle)
            copies.append(w)
        except TreadleError as e:
            log.warning("snapshot %s stays off %s: %s", adapter_id, w.label, e.message)
    return copies
