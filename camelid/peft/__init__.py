"""Parameter-efficient fine-tuning: each method acts on an existing model's modules by name (never a subclass)."""

from camelid.peft.adapter_io import load_adapter, save_adapter
from camelid.peft.lora import (LoRALinear, apply_lora, count_parameters, lora_layers, lora_state_dict, merge_lora,
                               unmerge_lora)

__all__ = ["LoRALinear", "apply_lora", "count_parameters", "load_adapter", "lora_layers", "lora_state_dict",
           "merge_lora", "save_adapter", "unmerge_lora"]
