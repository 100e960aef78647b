"""IA3 (peft): learned vectors that rescale the activations of a few layers (keys, values and
the feed-forward input in Llama), far fewer trainable parameters than LoRA. It merges into
the base (export), and the reference policy of dpo/kto is the adapter switched off."""

from __future__ import annotations

from typing import Any

from lathe.config.schema import FinetuneConfig, ModelConfig
from lathe.errors import ConfigError, did_you_mean
from lathe.model.methods import Method, register, start_from_adapters, task_heads
from lathe.model.methods.lora import linear_module_names

# Architectures peft has no IA3 default for: the same choice as for Llama (keys, values and
# the feed-forward output projection, whose input is scaled).
EXTRA_DEFAULTS = {"glm": (["k_proj", "v_proj", "down_proj"], ["down_proj"])}


def ia3_modules(model: Any, ft: FinetuneConfig) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) for `model`, checked against its layers."""
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    kind = getattr(model.config, "model_type", "")
    linear = linear_module_names(model)
    requested = [t.lower() if t.lower() in ("auto", "all") else t for t in ft.ia3_target]
    if requested == ["auto"] and kind in EXTRA_DEFAULTS and ft.ia3_feedforward is None:
        return EXTRA_DEFAULTS[kind]
    if requested == ["auto"]:
        if kind not in TARGETS:
            raise ConfigError(
                f"ia3_target: auto has no default for {kind or type(model).__name__}; name the layers "
                f"(ia3_target and ia3_feedforward) from: {', '.join(linear)}"
            )
        targets = list(TARGETS[kind])
    elif requested == ["all"]:
        targets = linear
    else:
        for name in requested:
            if name.rsplit(".", 1)[-1] not in linear:
                raise ConfigError(
                    f"ia3_target {name!r} is not a linear module of {type(model).__name__}"
                    f"{did_you_mean(name, linear)}; its linear modules are: {', '.join(linear)} "
                    "(or use ia3_target: auto)"
                )
        targets = requested
    if ft.ia3_feedforward is not None:
        feedforward = list(ft.ia3_feedforward)
        for name in feedforward:
            if name not in targets:
                raise ConfigError(f"ia3_feedforward {name!r} is not one of ia3_target ({', '.join(targets)})")
    else:
        known = [m.rsplit(".", 1)[-1] for m in FEEDFORWARD.get(kind, [])]
        feedforward = [t for t in targets if t.rsplit(".", 1)[-1] in known]
    return targets, feedforward


def apply(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> Any:
    from peft import IA3Config, get_peft_model

    model, continued = start_from_adapters(model, model_cfg)
    if continued:
        return model
    targets, feedforward = ia3_modules(model, ft)
    return get_peft_model(model, IA3Config(task_type=task_type, target_modules=targets,
                                           feedforward_modules=feedforward,
                                           modules_to_save=task_heads(model, task_type) or None))


register(Method(
    name="ia3",
    summary="learned scales on a few layers' activations (peft IA3): far fewer parameters than LoRA",
    apply=apply,
    adapter=True,
    can_merge=True,
    reference="the adapter switched off",
    quantized_base=False,
    peft_type="IA3",
))
