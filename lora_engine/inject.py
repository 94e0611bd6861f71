"""Put LoRA wrappers into a model, find them again, and take them out."""
from __future__ import annotations

from torch import nn

from .layers import LoRALayer, lora_class_for
from .spec import LoRASpec, closest_names, path_matches

SPECS_ATTR = "_lora_specs"  # on the root module: {adapter name: LoRASpec}


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA wrapper in the model by its first module path (a shared module is listed once)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALayer)}


def adapter_specs(model: nn.Module) -> dict[str, LoRASpec]:
    """The spec each adapter of this model was injected or loaded with."""
    return model.__dict__.setdefault(SPECS_ATTR, {})


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def find_targets(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Module paths matched by the spec's patterns; an unmatched pattern is an error naming near misses."""
    modules = {p: m for p, m in model.named_modules() if p and not _inside_lora_layer(p, model)}
    targets: dict[str, None] = {}
    for pattern in spec.target_modules:
        hits = [p for p in modules if path_matches(pattern, p)]
        usable = [p for p in hits if isinstance(modules[p], LoRALayer) or lora_class_for(modules[p])]
        if not usable:
            if hits:
                kinds = sorted({type(modules[p]).__name__ for p in hits})
                raise ValueError(f"target pattern {pattern!r} matched {len(hits)} module(s) of unsupported kind "
                                 f"{kinds}; LoRA wraps nn.Linear, transformers Conv1D and nn.Embedding")
            near = closest_names(pattern, [p for p in modules if lora_class_for(modules[p])
                                           or isinstance(modules[p], LoRALayer)])
            raise ValueError(f"target pattern {pattern!r} matched no module. Closest module names: {near}. "
                             "`*` matches exactly one path component, `**` any number.")
        targets.update(dict.fromkeys(usable))
    return list(targets)


def _inside_lora_layer(path: str, model: nn.Module) -> bool:
    parts = path.split(".")
    return any(p in ("lora_A", "lora_B") for p in parts)


def inject_lora(model: nn.Module, spec: LoRASpec, adapter: str = "default") -> list[str]:
    """Add adapter `adapter` to every module the spec targets, in place; returns the module paths.

    Base parameters are frozen, the new adapter's parameters are trainable, and the new adapter
    becomes the only active one (weight 1.0). Nothing is changed if the spec or the name is refused.
    """
    if not adapter or "." in adapter:
        raise ValueError(f"adapter name {adapter!r} must be non-empty and contain no '.'")
    if adapter in adapter_names(model):
        raise ValueError(f"adapter {adapter!r} is already injected; remove_adapter(model, {adapter!r}) first "
                         "or pick another name")
    if any(layer.merged is not None for layer in lora_layers(model).values()):
        raise RuntimeError("the model has a merged adapter: call unmerge(model) before injecting another")
    targets = find_targets(model, spec)
    for path in targets:
        layer = _wrap(model, path)
        layer.add_adapter(adapter, spec.rank_for(path), spec.scale_for(path), spec.dropout, spec.init)
    adapter_specs(model)[adapter] = spec
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(f".lora_A.{adapter}") or name.endswith(f".lora_B.{adapter}"))
    from .blend import set_blend
    set_blend(model, {adapter: 1.0})
    return targets


def _wrap(model: nn.Module, path: str) -> LoRALayer:
    """Replace the module at `path` (at every parent that holds it) by its LoRA wrapper, once."""
    module = model.get_submodule(path)
    if isinstance(module, LoRALayer):
        return module
    layer = lora_class_for(module)(module)
    _replace_everywhere(model, module, layer)
    return layer


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # A module can sit under several parents (a tied head, an inference wrapper sharing blocks):
    # replacing it at one parent only would leave the others running without the adapter.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


def remove_adapter(model: nn.Module, adapter: str) -> None:
    """Delete one adapter; a layer left with no adapter goes back to its original module."""
    layers = lora_layers(model)
    if adapter not in adapter_names(model):
        raise KeyError(f"no adapter {adapter!r}; the model has {adapter_names(model)}")
    if any(layer.merged is not None for layer in layers.values()):
        raise RuntimeError("the model has a merged adapter: call unmerge(model) before removing adapters")
    for layer in layers.values():
        if adapter in layer.lora_A:
            layer.remove_adapter(adapter)
        if not layer.adapters:
            _unwrap(model, layer)
    adapter_specs(model).pop(adapter, None)


def uninject_lora(model: nn.Module) -> None:
    """Remove every adapter and restore the original modules (same Parameter objects as before)."""
    for name in adapter_names(model):
        remove_adapter(model, name)


def _unwrap(model: nn.Module, layer: LoRALayer) -> None:
    base = layer.base_module
    base.weight = layer.weight  # the wrapper may have been moved/cast: hand back its current parameters
    if hasattr(layer, "bias") and "bias" in base._parameters:
        base.bias = layer.bias
    _replace_everywhere(model, layer, base)
