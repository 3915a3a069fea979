"""AdapterBank: every LoRA adapter of one base model, with routing, AdamW and checkpoint I/O.

Each adapter owns its tensors and optimizer state; nothing is shared between adapters, so an operation
on one adapter never changes another (ARCHITECTURE invariant 3).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import torch

from treadle.errors import NotFoundError, UserError
from treadle.lora.adamw import adamw_step
from treadle.lora.adapter import Adapter, new_adapter
from treadle.lora.config import AdamParams, LoraConfig
from treadle.lora.peft_io import read_adapter, write_adapter
from treadle.lora.routing import GroupedLora
from treadle.models.causal_lm import CausalLM
from treadle.models.hooks import LoraHook


class AdapterBank:
    def __init__(self, model: CausalLM, max_rank: int = 128) -> None:
        self.model = model
        self.max_rank = max_rank
        self.targets = model.lora_targets()
        self.device = next(model.parameters()).device
        self._adapters: dict[str, Adapter] = {}

    # -- registry ------------------------------------------------------------------------------------------

    def _get(self, adapter_id: str) -> Adapter:
        ad = self._adapters.get(adapter_id)
        if ad is None:
            raise NotFoundError(f"adapter_id: no adapter {adapter_id!r} on this model", field="adapter_id")
        return ad

    def _require_new(self, adapter_id: str) -> None:
        if not isinstance(adapter_id, str) or not adapter_id:
            raise UserError(f"adapter_id: must be a non-empty string, got {adapter_id!r}", field="adapter_id")
        if adapter_id in self._adapters:
            raise UserError(f"adapter_id: {adapter_id!r} already exists; pick a new id", field="adapter_id")

    def _trainable(self, adapter_id: str) -> Adapter:
        ad = self._get(adapter_id)
        if not ad.trainable:
            raise UserError(
                f"adapter_id: {adapter_id!r} is a frozen sampling snapshot and cannot be trained",
                field="adapter_id",
            )
        return ad

    def create(self, adapter_id: str, cfg: LoraConfig) -> None:
        self._require_new(adapter_id)
        cfg.validate(self.max_rank)
        self._adapters[adapter_id] = new_adapter(cfg, self.targets, self.device)

    def remove(self, adapter_id: str) -> None:
        self._get(adapter_id)
        del self._adapters[adapter_id]

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._adapters

    def ids(self) -> list[str]:
        return list(self._adapters)

    def config(self, adapter_id: str) -> LoraConfig:
        return self._get(adapter_id).config

    def weights_version(self, adapter_id: str) -> tuple[object, int]:
        """What identifies the weights behind `adapter_id` now: its `Adapter` object (a new one whenever the id
        is created, loaded or snapshotted) and how many parameter updates it received (`optim_step` is the only
        in-place change of its weights). The sampler keys retained KV on both."""
        ad = self._get(adapter_id)
        return ad, sum(st.step for st in ad.optim.values())

    # -- forward -------------------------------------------------------------------------------------------

    def hook(
        self, adapter_ids_B: Sequence[str | None], *, train_ids: Collection[str] | None = None
    ) -> LoraHook | None:
        """Grouped per-row routing for one batch (row b uses `adapter_ids_B[b]`, None = base model).

        `train_ids` names the adapters whose tensors may receive gradients from this batch (None = all).
        Pass it when a batch mixes forward-only rows with training rows: otherwise backward writes a zero
        `.grad` into the forward-only adapters, and their next `optim_step` would decay their moments.
        """
        slot_of: dict[str, int] = {}
        adapters: list[Adapter] = []
        slots: list[int] = []
        for aid in adapter_ids_B:
            if aid is None:
                slots.append(-1)
                continue
            if aid not in slot_of:
                ad = self._get(aid)
                if train_ids is not None and aid not in train_ids:
                    ad = ad.detached_view()
                slot_of[aid] = len(adapters)
                adapters.append(ad)
            slots.append(slot_of[aid])
        if not adapters:
            return None
        return GroupedLora(adapters, slots, self.device)

    # -- training ------------------------------------------------------------------------------------------

    def trainable_parameters(self, adapter_id: str) -> list[torch.Tensor]:
        """The adapter's A/B leaf tensors (empty for a frozen snapshot)."""
        ad = self._get(adapter_id)
        return [p for _, p in ad.named_parameters()] if ad.trainable else []

    def has_grad(self, adapter_id: str) -> bool:
        return any(p.grad is not None for _, p in self._get(adapter_id).named_parameters())

    def ensure_grad(self, adapter_id: str, key: str) -> None:
        """Give `key`'s A/B tensors a zero gradient where none has accumulated: what a backward that routed the
        adapter's rows through `key` with a zero gradient leaves (AdamW then decays their moments, as it does
        for every tensor the pass used)."""
        pair = self._get(adapter_id).weights.get(key)
        if pair is None:
            return
        for p in (pair.a_R_In, pair.b_Out_R):
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def zero_grad(self, adapter_id: str) -> None:
        for _, p in self._get(adapter_id).named_parameters():
            p.grad = None

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        """AdamW on the accumulated gradients, then clears them. Without gradients nothing changes."""
        params.validate()
        ad = self._trainable(adapter_id)
        metrics = adamw_step(ad.named_parameters(), ad.optim, params)
        self.zero_grad(adapter_id)
        return metrics

    # -- snapshots and checkpoints -------------------------------------------------------------------------

    def copy(self, src_id: str, dst_id: str) -> None:
        """`dst_id` becomes a frozen weights-only copy of `src_id` (later training of src never changes it)."""
        src = self._get(src_id)
        self._require_new(dst_id)
        self._adapters[dst_id] = src.frozen_copy()

    def save(self, adapter_id: str, directory: Path, *, optimizer: bool, base_model: str) -> None:
        """PEFT-layout checkpoint at `directory`, written atomically; an existing one there is replaced whole."""
        write_adapter(
            self._get(adapter_id),
            Path(directory),
            optimizer=optimizer,
            base_model=base_model,
            peft_names={t.key: t.peft_name for t in self.targets},
        )

    def load(self, adapter_id: str, directory: Path, *, optimizer: bool) -> LoraConfig:
        """Create `adapter_id` (trainable) from a treadle- or PEFT-made checkpoint; nothing changes on error."""
        self._require_new(adapter_id)
        ad = read_adapter(
            Path(directory), self.targets, self.max_rank, optimizer=optimizer, device=self.device
        )
        self._adapters[adapter_id] = ad
        return ad.config
