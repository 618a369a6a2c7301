"""Parameter-efficient fine-tuning: each method acts on an existing model's modules by name (never a subclass).

One file per family: lora.py (LoRA, rsLoRA, DoRA, QLoRA), prefix.py (prefix tuning, P-Tuning v2), prompt.py (prompt
tuning, P-tuning), adapters.py (bottleneck adapters), bitfit.py, ia3.py. methods.py saves and loads any of them by
the folder's peft_type; adapter_io.py is the PEFT LoRA format; shared.py holds what they all share (the name
rule, the one folder writer and reader).
"""

from camelid.peft.lora import (LoRALinear, apply_lora, count_parameters, lora_layers, lora_state_dict, merge_lora,
                               unmerge_lora)
from camelid.peft.methods import KINDS, applied_kinds, folder_kind, load_adapter, merge_adapter, save_adapter

__all__ = ["KINDS", "LoRALinear", "applied_kinds", "apply_lora", "count_parameters", "folder_kind", "load_adapter",
           "lora_layers", "lora_state_dict", "merge_adapter", "merge_lora", "save_adapter", "unmerge_lora"]
