"""Server-side custom losses (SDK `ServiceClient.create_custom_loss`): check and keep each uploaded loss for the
session that created it, and resolve `forward_backward(data, "custom", {"loss_id": …})` to it.

Losses live in memory for the server process, like the loaded models that use them: a LossHandle is only good
within its session, and after a restart that session's models must be loaded again anyway. A session keeps at
most `MAX_PER_SESSION` losses (the SDK creates each distinct loss once per session); the losses of sessions that
have ended are dropped when the next loss is created.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from treadle.engine.custom_loss import CustomLoss, build
from treadle.errors import NotFoundError, TreadleError, UserError, require
from treadle.service.results import CustomLossCreated
from treadle.service.state import ServiceState

MAX_PER_SESSION = 64


@dataclasses.dataclass(frozen=True)
class _Stored:
    owner: str
    session_id: str
    loss: CustomLoss


class CustomLosses:
    def __init__(self, state: ServiceState) -> None:
        self.s = state
        self._losses: dict[str, _Stored] = {}
        self._lock = threading.Lock()

    def create(
        self, owner: str, session_id: str, seq_id: int, name: object, inputs: object, graph: object
    ) -> str:
        """Queue-free: decoding and the dry run are small, so the future resolves at once (a retry of the same
        custom_loss_seq_id gets the same future and loss id)."""
        s = self.s
        s.active_session(owner, session_id)
        require(
            type(seq_id) is int and seq_id >= 0,
            "custom_loss_seq_id",
            f"must be an integer ≥ 0, got {seq_id!r}",
        )
        loss_id = f"{session_id}:custom_loss:{seq_id}"

        def run(rid: str) -> None:
            done = s.done(rid)
            try:
                loss = build(name, inputs, graph)
                with self._lock:
                    self._forget_ended_sessions(session_id)
                    count = sum(1 for x in self._losses.values() if x.session_id == session_id)
                    if count >= MAX_PER_SESSION and loss_id not in self._losses:
                        raise UserError(
                            f"custom_loss_seq_id: a session keeps at most {MAX_PER_SESSION} custom losses",
                            field="custom_loss_seq_id",
                        )
                    self._losses[loss_id] = _Stored(owner, session_id, loss)
            except TreadleError as e:
                done(e)
                return
            done(CustomLossCreated(loss_id))

        return s.submit(owner, "create_custom_loss", f"custom_loss:{loss_id}", run)

    def _forget_ended_sessions(self, current: str) -> None:
        """Drop the losses of sessions that are no longer active (finished or expired): no op can use them."""
        for sid in {x.session_id for x in self._losses.values()} - {current}:
            row = self.s.store.get_session(sid)
            if row is None or row.status != "active":
                self._losses = {k: v for k, v in self._losses.items() if v.session_id != sid}

    def resolve(self, owner: str, model_id: str, loss_fn_config: dict[str, Any]) -> CustomLoss:
        """The loss `loss_fn_config["loss_id"]` names, if this model's session created it."""
        loss_id = loss_fn_config.get("loss_id")
        extra = sorted(set(loss_fn_config) - {"loss_id"})
        require(not extra, "loss_fn_config", f"custom takes only loss_id, got {', '.join(extra)}")
        require(
            isinstance(loss_id, str) and bool(loss_id),
            "loss_fn_config.loss_id",
            "is required by loss_fn 'custom': the id create_custom_loss returned",
        )
        model = self.s.model(owner, model_id)
        with self._lock:
            stored = self._losses.get(str(loss_id))
        if stored is None or stored.owner != owner or stored.session_id != model.session_id:
            raise NotFoundError(
                f"loss_fn_config.loss_id: no custom loss {loss_id!r} in this model's session (a loss works only "
                "in the session that created it, for the life of the server process)",
                field="loss_fn_config.loss_id",
            )
        return stored.loss
