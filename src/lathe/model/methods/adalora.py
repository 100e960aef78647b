"""AdaLoRA (peft): LoRA whose rank budget is reallocated while training. Every layer starts
at adalora_init_r; after adalora_tinit steps the least important singular values are pruned
each adalora_deltaT steps until the average rank is adalora_target_r, which then trains for
the last adalora_tfinal steps. The pruning needs the gradients of each step, so the method
brings a callback that calls peft's update_and_allocate after every optimizer step. It
merges into the base (export); the reference policy of dpo/kto is the adapter switched off.
"""

from __future__ import annotations

from typing import Any

from lathe.config.schema import TASK_STAGES, FinetuneConfig, ModelConfig
from lathe.errors import ConfigError
from lathe.model.methods import Method, register, task_heads
from lathe.model.methods.lora import resolve_lora_targets


def schedule(ft: FinetuneConfig, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of `total_steps`, checked to leave a budgeting phase."""
    tinit = ft.adalora_tinit if ft.adalora_tinit is not None else total_steps // 10
    tfinal = ft.adalora_tfinal if ft.adalora_tfinal is not None else total_steps // 5
    if tinit >= total_steps - tfinal:
        raise ConfigError(f"adalora_tinit ({tinit}) + adalora_tfinal ({tfinal}) leave no steps to reallocate "
                          f"ranks in a run of {total_steps} steps; lower them or train longer")
    return tinit, tfinal


def apply(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> Any:
    from peft import AdaLoraConfig, get_peft_model

    # The real schedule is set when training starts and the step count is known (the callback);
    # peft wants one now.
    config = AdaLoraConfig(
        task_type=task_type,
        init_r=ft.adalora_init_r,
        target_r=ft.adalora_target_r,
        tinit=0, tfinal=0, total_step=1 << 30,
        deltaT=ft.adalora_deltaT,
        orth_reg_weight=ft.adalora_orth_reg_weight,
        lora_alpha=ft.lora_alpha if ft.lora_alpha is not None else 2 * ft.adalora_init_r,
        lora_dropout=ft.lora_dropout,
        target_modules=resolve_lora_targets(model, ft.lora_target),
        modules_to_save=task_heads(model, task_type) or None,
    )
    return get_peft_model(model, config)


def rank_budget(model: Any) -> int:
    """The ranks in use now, summed over layers (peft masks pruned singular values to 0)."""
    import torch

    total = 0
    for module in model.modules():
        ranknum = getattr(module, "lora_E", None)
        if ranknum is not None and "default" in ranknum:
            total += int(torch.count_nonzero(ranknum["default"]).item())
    return total


def prepare_trainer(trainer: Any, cfg: Any) -> None:
    import warnings

    from transformers import TrainerCallback

    ft = cfg.finetune
    # a layer pruned to rank 0 is saved as a zero-sized tensor, which peft takes for an
    # unsharded ZeRO-3 save; here it is what AdaLoRA decided
    warnings.filterwarnings("ignore", message=r"Adapter '\w+': \d+ LoRA tensor\(s\) have invalid shape")

    class Reallocate(TrainerCallback):
        """peft's update_and_allocate after each optimizer step, while gradients are there."""

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            config = trainer.model.peft_config["default"]
            config.tinit, config.tfinal = schedule(ft, state.max_steps)
            config.total_step = state.max_steps

        def on_optimizer_step(self, args, state, control, **kw):  # noqa: ANN001
            # called before global_step counts this step, as peft's own examples number them
            trainer.model.base_model.update_and_allocate(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs is not None and "loss" in logs:
                logs["adalora_rank"] = rank_budget(trainer.model)

    trainer.add_callback(Reallocate())


register(Method(
    name="adalora",
    summary="AdaLoRA (peft): LoRA whose rank budget shrinks to the layers that matter while training",
    apply=apply,
    adapter=True,
    can_merge=True,
    reference="the adapter switched off",
    quantized_base=False,
    peft_type="ADALORA",
    stages=("pt", "sft", "rm", "dpo", "kto", *TASK_STAGES),  # ppo runs its own loop: no reallocation callback
    prepare_trainer=prepare_trainer,
))
