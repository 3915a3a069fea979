"""treadle.lora: multi-adapter LoRA — adapter slots, per-row routing, AdamW state, PEFT checkpoint I/O."""

from treadle.lora.adamw import adamw_step
from treadle.lora.adapter import AdamState, Adapter, LoraPair, new_adapter
from treadle.lora.bank import AdapterBank
from treadle.lora.peft_io import read_adapter, write_adapter
from treadle.lora.routing import RoutedLora

__all__ = [
    "AdamState",
    "Adapter",
    "AdapterBank",
    "LoraPair",
    "RoutedLora",
    "adamw_step",
    "new_adapter",
    "read_adapter",
    "write_adapter",
]
