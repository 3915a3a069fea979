"""Slot-based KV cache for the sampler: one slot per running sequence, per-slot lengths, grown geometrically.

Storage is `(layers, slots, kv_heads, capacity, head_dim)` for keys and values. A model step sees the cache
through a `CacheStep` (the `KVCacheHook` the model calls), which writes the step's keys/values into the
step's slots at their positions and returns every key/value those rows may attend to.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Keys/values of up to `max_slots` sequences of up to `max_len` tokens each.

    Capacity (slots and length) starts small and doubles on demand, so a server configured for long contexts
    and large batches pays memory only for what it runs; growth copies, but happens O(log n) times.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_slots: int = 8,
        initial_len: int = 256,
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_slots, self.max_len = max_slots, max_len
        self.dtype, self.device = dtype, device
        slots, length = min(initial_slots, max_slots), min(initial_len, max_len)
        self._initial = (slots, length)
        self.k = self._alloc(slots, length)
        self.v = self._alloc(slots, length)

    def reset(self) -> None:
        """Drop every slot's contents and return to the initial (small) allocation."""
        self.k = self._alloc(self._initial[0], self._initial[1])
        self.v = self._alloc(self._initial[0], self._initial[1])

    def _alloc(self, slots: int, length: int) -> torch.Tensor:
        shape = (self.num_layers, slots, self.num_kv_heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held now (keys and values)."""
        return 2 * self.k.numel() * self.k.element_size()

    def grown_shape(self, slots: int, length: int) -> tuple[int, int]:
        """(slots, length) of the allocation after `ensure(slots, length)`: doubled until it fits."""
        new_slots, new_len = self.num_slots, self.capacity
        while new_slots < slots:
            new_slots = min(2 * new_slots, self.max_slots)
        while new_len < length:
            new_len = min(2 * new_len, self.max_len)
        return new_slots, new_len

    def nbytes_after(self, slots: int, length: int) -> int:
        """Bytes the cache would hold after `ensure(slots, length)` (never less than now)."""
        new_slots, new_len = self.grown_shape(min(slots, self.max_slots), min(length, self.max_len))
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()
        return new_slots * new_len * per_token

    def ensure(self, slots: int, length: int) -> None:
        """Grow (by doubling) so that slot indices < `slots` and positions < `length` exist."""
        if slots > self.max_slots or length > self.max_len:
            raise ValueError(f"KV cache request ({slots} slots, {length} tokens) exceeds its limits")
        if slots <= self.num_slots and length <= self.capacity:
            return
        new_slots, new_len = self.grown_shape(slots, length)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = self._alloc(new_slots, new_len)
            new[:, : old.shape[1], :, : old.shape[3]] = old
            setattr(self, name, new)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot `dst` gets slot `src`'s first `n` positions (prompt sharing and the prefix cache)."""
        if src == dst or n == 0:
            return
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    def step(self, slots: list[int], starts: list[int], lengths: list[int]) -> CacheStep:
        """A hook for one model call: row b writes `lengths[b]` new tokens to slot `slots[b]` from `starts[b]`
        (rows shorter than the longest are right-padded; their padding is neither stored nor attended)."""
        self.ensure(max(slots) + 1, max(a + n for a, n in zip(starts, lengths, strict=True)))
        return CacheStep(self, slots, starts, lengths)


class CacheStep:
    """The `KVCacheHook` of one model call, with the matching `positions_B_T` and `mask_B_T_S` (True = may
    attend): query t of row b sits at position starts[b] + t and sees keys 0..starts[b] + t of its own slot."""

    def __init__(self, cache: SlotKVCache, slots: list[int], starts: list[int], lengths: list[int]) -> None:
        dev = cache.device
        self.cache = cache
        B, T = len(slots), max(lengths)
        ends = [a + n for a, n in zip(starts, lengths, strict=True)]
        self.S = max(ends)
        lo = slots[0]
        # A run of consecutive slots is read as a view; anything else needs a gather (a copy).
        self._contiguous = slots == list(range(lo, lo + B))
        self._lo = lo
        self.slots_B = torch.tensor(slots, device=dev)
        starts_B = torch.tensor(starts, device=dev)
        self.positions_B_T = starts_B[:, None] + torch.arange(T, device=dev)[None, :]
        last_B_T = self.positions_B_T
        self._valid_B_T: torch.Tensor | None = None
        if min(lengths) < T:
            lengths_B = torch.tensor(lengths, device=dev)
            self._valid_B_T = torch.arange(T, device=dev)[None, :] < lengths_B[:, None]
            # a padding query looks at its row's real keys only (its output is discarded; it just must not be
            # a fully masked row)
            last_B_T = torch.minimum(last_B_T, (torch.tensor(ends, device=dev) - 1)[:, None])
        self.mask_B_T_S = torch.arange(self.S, device=dev)[None, None, :] <= last_B_T[:, :, None]

    def update(
        self, layer: int, k_B_H_T_d: torch.Tensor, v_B_H_T_d: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        k_all, v_all = c.k[layer], c.v[layer]  # (slots, H, capacity, d)
        k_B_T_H_d = k_B_H_T_d.transpose(1, 2).to(c.dtype)
        v_B_T_H_d = v_B_H_T_d.transpose(1, 2).to(c.dtype)
        idx_slot, idx_pos = self.slots_B[:, None].expand_as(self.positions_B_T), self.positions_B_T
        if self._valid_B_T is not None:
            valid = self._valid_B_T
            idx_slot, idx_pos, k_B_T_H_d, v_B_T_H_d = (
                idx_slot[valid],
                idx_pos[valid],
                k_B_T_H_d[valid],
                v_B_T_H_d[valid],
            )
        # Advanced indices around a slice put the indexed dims first: the stored value is (B, T, H, d).
        k_all[idx_slot, :, idx_pos] = k_B_T_H_d
        v_all[idx_slot, :, idx_pos] = v_B_T_H_d
        if self._contiguous:
            B = self.slots_B.shape[0]
            return k_all[self._lo : self._lo + B, :, : self.S], v_all[self._lo : self._lo + B, :, : self.S]
        return k_all[self.slots_B, :, : self.S], v_all[self.slots_B, :, : self.S]
