"""Several processes: who we are (rank, world), how the processes meet, and which engine
(DDP, DeepSpeed ZeRO, FSDP) the run asks for."""

from __future__ import annotations

import os
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def deepspeed_on_cpu(timeout_s: int) -> dict[str, Any]:
    """DeepSpeed on CPU processes (gloo): accelerate only meets DeepSpeed on an accelerator, so
    the process group is set up here, as DeepSpeed's, and TrainingArguments told to use it."""
    from datetime import timedelta

    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=timedelta(seconds=timeout_s))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"accelerator_config": {"use_configured_state": True}}


def prepare_frozen(trainer: Any, model: Any) -> Any:
    """A frozen helper model (dpo/kto's reference, a reward model) placed as the trainer's
    engine places the policy: under DeepSpeed an inference engine of its own (ZeRO-3 keeps it
    sharded, and gathers each layer as it runs); else moved to the run's device."""
    if not trainer.is_deepspeed_enabled:
        return model.to(trainer.args.device)
    import copy

    import deepspeed

    ds = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:  # ZeRO-1/2 shard what training holds: a frozen model holds none of it
        zero["stage"] = 0
    zero.pop("offload_optimizer", None)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine
