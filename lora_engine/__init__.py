"""A small, exact LoRA engine: inject, blend at runtime, merge/unmerge bit for bit, save/load adapters."""
from .blend import get_blend, set_blend
from .inject import adapter_names, adapter_specs, inject_lora, lora_layers, remove_adapter, uninject_lora
from .layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear
from .merge import merge, merge_memory_bytes, unmerge
from .spec import LoRASpec
from .adapter_io import save_adapter, load_adapter
from .peft_compat import export_peft, import_peft

__all__ = [
    "LoRASpec", "inject_lora", "set_blend", "get_blend", "merge", "unmerge", "remove_adapter", "uninject_lora",
    "lora_layers", "adapter_names", "adapter_specs", "merge_memory_bytes",
    "LoRALayer", "LoRALinear", "LoRAConv1D", "LoRAEmbedding",
    "save_adapter", "load_adapter", "export_peft", "import_peft",
]
