"""LoRA (peft): low-rank updates on linear layers, with DoRA, rsLoRA, modules trained in
full beside it (additional_target), and QLoRA (a 4/8-bit base prepared for k-bit training).
It merges into the base (export), and the reference policy of dpo/kto/ppo is the model with
the adapter switched off (or a frozen copy of a continued adapter)."""

from __future__ import annotations

from typing import Any

from lathe.config.schema import FinetuneConfig, ModelConfig
from lathe.errors import ConfigError, ModelError, did_you_mean
from lathe.model.methods import Method, register, start_from_adapters, task_heads

# Output heads that never get LoRA, whatever the architecture calls them.
HEAD_NAMES = {"lm_head", "output_layer", "embed_out", "score", "classifier", "v_head", "qa_outputs"}


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer except the output head (per architecture)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: set[str] = set()
    for full_name, module in model.named_modules():
        if module is head:
            continue
        is_linear = isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__ in (
            "Linear4bit", "Linear8bitLt"
        )
        leaf = full_name.rsplit(".", 1)[-1]
        if is_linear and leaf not in HEAD_NAMES:
            names.add(leaf)
    return sorted(names)


def resolve_lora_targets(model: Any, requested: list[str]) -> list[str]:
    available = linear_module_names(model)
    if [t.lower() for t in requested] == ["all"]:
        if not available:
            raise ModelError(f"{type(model).__name__} has no linear layers that LoRA can target")
        return available
    for name in requested:
        if name not in available:
            raise ConfigError(
                f"lora_target {name!r} is not a linear module of {type(model).__name__}"
                f"{did_you_mean(name, available)}; its linear modules are: {', '.join(available)} "
                "(or use lora_target: all)"
            )
    return list(requested)


def apply_lora(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig,
               task_type: str = "CAUSAL_LM", continue_adapter: bool = True) -> Any:
    """LoRA on `model`. Given adapters: earlier ones are merged into the base and the last
    is trained further; with `continue_adapter=False` (a new head, e.g. a reward model)
    all of them are merged and a fresh adapter is made."""
    from peft import LoraConfig, get_peft_model

    model, continued = start_from_adapters(model, model_cfg, continue_last=continue_adapter)
    if continued:
        return model
    config = LoraConfig(
        task_type=task_type,
        r=ft.lora_rank,
        lora_alpha=ft.lora_alpha if ft.lora_alpha is not None else 2 * ft.lora_rank,
        lora_dropout=ft.lora_dropout,
        target_modules=resolve_lora_targets(model, ft.lora_target),
        use_dora=ft.use_dora,
        use_rslora=ft.use_rslora,
        init_lora_weights=pissa_init_name(ft) or True,
        modules_to_save=resolve_additional_targets(model, ft.additional_target) + task_heads(model, task_type)
        or None,
    )
    return get_peft_model(model, config)


def resolve_additional_targets(model: Any, requested: list[str] | None) -> list[str]:
    """additional_target names must be modules of the model (peft would skip a typo silently)."""
    if not requested:
        return []
    leaves = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
    for name in requested:
        if name not in leaves:
            raise ConfigError(
                f"additional_target {name!r} is not a module of {type(model).__name__}"
                f"{did_you_mean(name, leaves)}; e.g. embed_tokens or lm_head"
            )
    return list(requested)




def pissa_init_name(ft: FinetuneConfig) -> str | None:
    """peft's init_lora_weights for PiSSA: exact SVD, or fast SVD with pissa_iter iterations."""
    if not ft.pissa_init:
        return None
    return "pissa" if ft.pissa_iter == -1 else f"pissa_niter_{ft.pissa_iter}"


def apply(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> Any:
    if model_cfg.quantization_bit is not None:  # QLoRA: norms in float32, inputs that take grads
        from peft import prepare_model_for_kbit_training

        # gradient checkpointing stays the run's choice (ready_for_training), not peft's default
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_lora(model, ft, model_cfg, task_type=task_type, continue_adapter=not ft.create_new_adapter)


# --- what the Trainer needs: LoRA+ parameter groups, PiSSA's starting adapter -------------

PISSA_INIT = "pissa_init"  # in the run directory: the adapter as PiSSA made it, before training


def loraplus_optimizer(model: Any, args: Any, ft: FinetuneConfig) -> Any:
    """The optimizer of `args.optim` with LoRA+ groups: B matrices (and DoRA magnitudes) at
    learning_rate x loraplus_lr_ratio, A at learning_rate, LoRA on embeddings at
    loraplus_lr_embedding."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate,
                                     loraplus_lr_ratio=ft.loraplus_lr_ratio,
                                     loraplus_lr_embedding=ft.loraplus_lr_embedding,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)


def save_pissa_init(model: Any, run_dir: str) -> None:
    """Keep the adapter PiSSA started from (once; a resumed run re-creates the same one from
    the seed), so the end of the run can turn the trained adapter into a plain LoRA."""
    from pathlib import Path

    folder = Path(run_dir) / PISSA_INIT
    if (folder / "adapter_config.json").is_file():
        return
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # loads as plain LoRA
    try:
        model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init


def convert_pissa(model: Any, run_dir: str) -> None:
    """Overwrite the run's adapter with its plain-LoRA form, which applies to the original
    base model (PiSSA trained against the base minus its principal components)."""
    import warnings
    from pathlib import Path

    with warnings.catch_warnings():  # peft's advice to convert, said while converting
        warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
        model.save_pretrained(run_dir, path_initial_model_for_weight_conversion=str(Path(run_dir) / PISSA_INIT))


def prepare_trainer(trainer: Any, cfg: Any) -> None:
    ft = cfg.finetune
    if ft.loraplus_lr_ratio is not None:
        trainer.optimizer = loraplus_optimizer(trainer.model, trainer.args, ft)
    if ft.pissa_init and cfg.train.do_train and trainer.is_world_process_zero():
        save_pissa_init(trainer.model, cfg.train.output_dir)


def after_training(trainer: Any, cfg: Any) -> str | None:
    if cfg.finetune.pissa_init and trainer.is_world_process_zero():
        convert_pissa(trainer.model, cfg.train.output_dir)
        return f"the PiSSA adapter was saved as a plain LoRA of the base model ({PISSA_INIT}/ holds its start)"
    return None


register(Method(
    name="lora",
    summary="low-rank adapters on linear layers (peft); DoRA, rsLoRA, PiSSA, LoRA+, additional_target; QLoRA",
    apply=apply,
    adapter=True,
    can_merge=True,
    reference="the adapter switched off (continuing an adapter: a frozen copy of it)",
    quantized_base=True,
    peft_type="LORA",
    prepare_trainer=prepare_trainer,
    after_training=after_training,
))
