"""The update engine of a training loop that is Lathe's own (ppo), not the Trainer's: the same
few calls whatever trains the model underneath.

    engine = update_engine(peers, model, optimizer, scheduler, accumulation=ga, max_grad_norm=1.0,
                           deepspeed_args=args)   # TrainingArguments with deepspeed=..., or None
    out = engine(batch..., stepping=s)            # the forward, through DDP / the DeepSpeed engine
    engine.backward(loss, stepping=s)             # accumulate; an optimizer step when s
    with engine.gathered():                       # whole weights for generation (ZeRO-3)
        model.generate(...)
    state = engine.state_dict(module, trainable_only)  # complete tensors on the main process (ZeRO-3)

- `Updates`: one process or torch DDP: the loss divided by the accumulation, DDP's no_sync
  between optimizer steps, clipping, the optimizer and scheduler steps.
- `DeepSpeedUpdates`: `deepspeed.initialize` on the model, the optimizer and the scheduler,
  with the config's "auto" values filled by transformers from the TrainingArguments (as the
  Trainer fills them). The accumulation boundary is set per micro-batch (as accelerate does), so
  the loop keeps its own schedule (a step at the end of each pass too). Under ZeRO-3 the model
  was sharded as it loaded (the TrainingArguments exist first); generation runs inside
  `GatheredParameters`, and saving gathers one tensor at a time to the main process.
  Frozen helper models (a reference, a reward model) get an inference engine of their own
  (`frozen`), so under ZeRO-3 they stay sharded too.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lathe.distributed import Peers, _quiet_stdout


class Updates:
    """One process, or torch DDP over the processes of `peers`."""

    def __init__(self, peers: Peers, model: Any, optimizer: Any, scheduler: Any, *, accumulation: int,
                 max_grad_norm: float) -> None:
        self.peers, self.module = peers, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.wrapped = peers.wrap(model)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, *args: Any, stepping: bool = True) -> Any:
        """The forward of a micro-batch; `stepping`: whether an optimizer step follows its
        backward (DDP syncs the gradients in the backward of a forward run outside no_sync)."""
        with self.peers.no_sync(self.wrapped, accumulating=not stepping):
            return self.wrapped(*args)

    def backward(self, loss: Any, stepping: bool) -> None:
        import torch

        (loss / self.accumulation).backward()
        if stepping:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def gathered(self) -> Any:
        return contextlib.nullcontext()

    def frozen(self, model: Any) -> Any:
        return model.to(self.peers.device)

    def state_dict(self, module: Any, trainable_only: bool) -> dict[str, Any] | None:
        """`module`'s complete tensors by name (the trained ones only, or all) on the main
        process, where a process does not hold them whole (ZeRO-3); None where it does (the
        module's own state_dict is then complete). Every process calls it."""
        return None

    @property
    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class DeepSpeedUpdates(Updates):
    """DeepSpeed ZeRO over the processes (on CPU processes too, over gloo)."""

    def __init__(self, peers: Peers, model: Any, optimizer: Any, scheduler_for: Any, *, accumulation: int,
                 max_grad_norm: float, args: Any, num_training_steps: int, sizes_from: Any = None) -> None:
        import deepspeed

        hf = args.hf_deepspeed_config
        # the "auto" sizes from the transformers model's config (hidden size), as the Trainer fills them
        hf.trainer_config_finalize(args, sizes_from if sizes_from is not None else model, num_training_steps)
        self.config = config = hf.config
        self.zero3 = hf.is_zero3()
        if hf.is_offload() and config.get("zero_force_ds_cpu_optimizer", True):
            from accelerate.utils import map_pytorch_optim_to_deepspeed

            optimizer = map_pytorch_optim_to_deepspeed(optimizer)  # DeepSpeed's CPU Adam, as accelerate does
        config["zero_allow_untested_optimizer"] = True
        scheduler = scheduler_for(optimizer)
        with _quiet_stdout():
            engine, optimizer, _, scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.engine = engine
        self.peers, self.module = peers, model
        self.optimizer, self.scheduler = optimizer, scheduler  # accumulation and clipping: the config's

    def __call__(self, *args: Any, stepping: bool = True) -> Any:
        return self.engine(*args)

    def backward(self, loss: Any, stepping: bool) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps (the loop's), clips by its
        # gradient_clipping (max_grad_norm) and steps the optimizer and scheduler at a boundary
        self.engine.set_gradient_accumulation_boundary(stepping)
        self.engine.backward(loss)
        if stepping:
            self.engine.step()

    def gathered(self) -> Any:
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        # ZeRO-3 prefetches the layers it expects next: those gathers are waited for and
        # released first (a parameter still in flight cannot be gathered and released again)
        self.engine.empty_partition_cache()
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()))

    def frozen(self, model: Any) -> Any:
        return frozen_engine(model, self.config)

    def state_dict(self, module: Any, trainable_only: bool) -> dict[str, Any] | None:
        """Complete tensors on the main process (empty elsewhere): under ZeRO-3 each sharded one
        is gathered on its own, so no process ever holds more than one whole tensor beyond its
        share."""
        if not self.zero3:
            return None
        import deepspeed

        self.engine.empty_partition_cache()  # as in gathered()
        out: dict[str, Any] = {}
        for name, p in module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([p]):
                if self.peers.main:
                    out[name] = p.detach().cpu().clone()
        if self.peers.main and not trainable_only:
            saved = module.state_dict(keep_vars=True).keys()  # persistent buffers only
            out.update({name: b.detach().cpu() for name, b in module.named_buffers() if name in saved})
        return out


def frozen_engine(model: Any, training_config: dict[str, Any]) -> Any:
    """A frozen helper model placed as DeepSpeed places the trained one: an inference engine
    (ZeRO-3 keeps it sharded and gathers each layer as it runs; ZeRO-1/2 shard only what training
    holds, which a frozen model holds none of, so it runs whole)."""
    import copy

    import deepspeed

    ds = copy.deepcopy(training_config)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        zero["stage"] = 0
    zero.pop("offload_optimizer", None)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    with _quiet_stdout():
        engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


def update_engine(peers: Peers, model: Any, optimizer: Any, scheduler_for: Any, *, accumulation: int,
                  max_grad_norm: float, deepspeed_args: Any = None, num_training_steps: int = 0,
                  sizes_from: Any = None) -> Updates:
    """The engine for this run: DeepSpeed when `deepspeed_args` (TrainingArguments with a
    deepspeed config) are given, else one process or DDP. `scheduler_for(optimizer)` makes the
    scheduler (DeepSpeed's offload may swap the optimizer first); `sizes_from`: the transformers
    model inside `model` whose config sizes DeepSpeed's buffers."""
    if deepspeed_args is not None:
        return DeepSpeedUpdates(peers, model, optimizer, scheduler_for, accumulation=accumulation,
                                max_grad_norm=max_grad_norm, args=deepspeed_args,
                                num_training_steps=num_training_steps, sizes_from=sizes_from)
    return Updates(peers, model, optimizer, scheduler_for(optimizer), accumulation=accumulation,
                   max_grad_norm=max_grad_norm)
