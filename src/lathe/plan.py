"""`lathe plan`: what a training run will need, before anything is downloaded or trained.

From the config alone: the model's config.json (never its weights), the data (tokenized as the run
would, a sample of it for a large dataset) and the engine keys. Per device it estimates:

- weights: every parameter at the dtype the run loads (4/8-bit linear layers under QLoRA), and
  the frozen copies a stage keeps beside the policy (dpo/kto's reference for full and freeze
  tuning, ppo's reward model);
- gradients and optimizer states: for what the method trains, exactly. The model is built on
  torch's meta device (shapes, no memory) and the method applied to it, so LoRA's, IA3's or a
  prompt encoder's trainable parameters are counted, not guessed;
- activations: the same meta model runs one training step, forward and backward, with every
  tensor the operators make counted while it lives (what autograd keeps, the temporaries, the
  recomputation of gradient checkpointing): the most at once, for the micro-batch that holds
  the longest example. sdpa and FlashAttention are simulated by what their fused kernels keep
  (no sequence x sequence scores); eager attention (flash_attn: disabled) as it runs;
- the logits: tokens x vocabulary, in float32, with the log-softmax and the gradient of the
  loss (3 such tensors), or one chunk of them under the fused loss;
- the runtime: torch and the libraries themselves, as this process holds them after the same
  imports (on CPU), or a CUDA context (on a GPU);
- ZeRO stage 1/2/3 (and FSDP) divide optimizer states / gradients / weights by the processes;
  offloading moves them to the host.

Tokens/s comes from this device's measured matrix-multiply rate and the FLOPs of a step (2 per
parameter per token forward, 2 backward through the activations, 2 more for each trained
weight, attention's own), at the share of that rate training reaches here (MFU, calibrated by
benchmarks/plan_bench.py). The memory estimate is checked against measured peaks by that
benchmark, per method (results/plan_memory.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError, ModelError

MiB = 2**20
GiB = 2**30
LOGIT_COPIES = 3  # the logits, their log-softmax, the loss's gradient of them (float32)
SAMPLE_ROWS = 2000  # rows tokenized for the lengths when the dataset is larger
CPU_RETAINED = 1.7  # the CPU process's peak over the step's simulated live bytes (benchmarks/plan_bench.py)
CUDA_CONTEXT = 500 * MiB  # what a CUDA context and torch's kernels take on a GPU, typically
CPU_RUNTIME = 900 * MiB  # what torch and the libraries take in a CPU training process, typically
# the share of a large matrix multiply's rate that a training step reaches: measured on this
# project's CPU machines by benchmarks/plan_bench.py (LoRA SFT of a 27M Llama); a GPU's share
# is of the same order for models of a few billion parameters (published MFU 0.3-0.5)
MFU = {"cpu": 0.35, "cuda": 0.35}


@dataclass
class Part:
    name: str
    bytes: int
    how: str
    where: str = "device"  # or "host" (offloaded)


@dataclass
class Plan:
    device: str
    processes: int
    engine: str
    model: str
    params: int
    trainable: int
    dtype: str
    parts: list[Part]
    available: int | None  # bytes of one device, when known
    tokens_per_step: float  # mean non-padding tokens of one optimizer step, all processes
    peak_step_tokens: int  # tokens (with padding) of one micro-batch on a device, at its largest
    steps: int
    tokens_per_s: float | None
    seconds: float | None
    activation_per_token: dict[str, float]  # bytes: {"saved": .., "checkpointed": ..}
    notes: list[str] = field(default_factory=list)
    # MFU's terms: the model FLOPs of one trained token (forward 2 per matmul weight + attention,
    # backward through the activations as much again, 2 more per trained weight; no recompute)
    # and this device's measured matmul rate (FLOP/s)
    model_flops_per_token: float | None = None
    device_flops: float | None = None
    advice: list[str] = field(default_factory=list)
    checkpointing: bool = False  # gradient checkpointing in the planned run (set, or decided: decide_checkpointing)
    checkpointing_why: str | None = None  # the decision, when gradient_checkpointing is unset

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts if p.where == "device")

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total"] = self.total
        out["fits"] = self.fits
        return out


def plan(config: str | os.PathLike | Mapping[str, Any] | None,
         overrides: list[str] | Mapping[str, Any] | None = None, output: str | os.PathLike | None = None) -> Plan:
    """`lathe plan`: the estimate for a training config, printed; `gpus=N` and `gpu_memory=GiB`
    plan for a machine other than this one. Returns the Plan (written as JSON to `output`)."""
    from lathe.config.load import parse_overrides
    from lathe.quiet import quiet_warnings

    quiet_warnings()
    keys = parse_overrides(overrides)
    gpus, gpu_memory = _plan_keys(keys)
    cfg = _load(config, keys, gpus)
    result = make_plan(cfg, gpus, gpu_memory)
    print(format_plan(result))
    if output is not None:
        Path(output).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"Plan JSON: {output}")
    return result


def _plan_keys(keys: dict[str, Any]) -> tuple[int | None, float | None]:
    gpus = keys.pop("gpus", None)
    gpu_memory = keys.pop("gpu_memory", None)
    try:
        gpus = None if gpus is None else int(gpus)
        gpu_memory = None if gpu_memory is None else float(gpu_memory)
    except (TypeError, ValueError):
        raise ConfigError(f"gpus={gpus} / gpu_memory={gpu_memory}: gpus is a whole number of GPUs, gpu_memory "
                          "the GiB of one (gpus=8 gpu_memory=80)") from None
    if gpus is not None and gpus < 1:
        raise ConfigError(f"gpus={gpus} must be at least 1")
    if gpu_memory is not None and gpu_memory <= 0:
        raise ConfigError(f"gpu_memory={gpu_memory} must be more than 0 (GiB of one GPU)")
    return gpus, gpu_memory


def _load(config: Any, keys: dict[str, Any], gpus: int | None) -> LatheConfig:
    """The training config as `lathe train` reads it (its checks included); output_dir may be
    left out, nothing is written there."""
    from lathe.config.load import load_config

    if gpus is not None:
        keys = {**keys, "nproc_per_node": 1}  # the processes are planned, not started
    cfg = load_config(config, keys, defaults={"output_dir": "<not written by lathe plan>"})
    if not cfg.data.dataset:
        raise ConfigError("dataset is missing; name one or more entries of dataset_info.json (the plan reads "
                          "the lengths of its examples)")
    return cfg


# --- the estimate ------------------------------------------------------------------------------

def make_plan(cfg: LatheConfig, gpus: int | None = None, gpu_memory: float | None = None,
              memory_only: bool = False) -> Plan:
    """The plan; `memory_only`: without the tokens/s measurement (the run's own decision)."""
    import torch

    from lathe.distributed import engine_name, read_deepspeed, zero_stage
    from lathe.model.load import resolve_model_path

    on_gpu = gpus is not None or torch.cuda.is_available()
    processes = gpus or max(1, cfg.train.nproc_per_node, _ranks())  # _ranks: inside a run torchrun started
    extra = cfg.train.extra
    notes: list[str] = []

    path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.model_revision, cfg.model.cache_dir)
    model_config = _model_config(cfg, path)
    dtype = _dtype(cfg, on_gpu)
    model, trainable_dtype_bytes = _meta_model(cfg, model_config, dtype)
    from lathe.model.adapters import count_parameters

    trainable, total = count_parameters(model)
    weight_bytes = _weight_bytes(cfg, model, dtype)

    lengths, kept_lengths, rows_total, sampled = _lengths(cfg, path)
    if sampled:
        notes.append(f"data: lengths from a sample of {len(lengths):,} of {rows_total:,} rows")
    batch = cfg.train.per_device_train_batch_size
    accum = int(extra.get("gradient_accumulation_steps", 1) or 1)
    peak_tokens, peak_rows, padded = _peak_step(cfg, kept_lengths, batch)

    ds = read_deepspeed(extra["deepspeed"]) if extra.get("deepspeed") else None
    stage = zero_stage(ds) if ds else (3 if extra.get("fsdp") else 0)
    zero = (ds or {}).get("zero_optimization", {}) if ds else {}
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    shard = processes if processes > 1 else 1

    parts: list[Part] = []
    w = weight_bytes / (shard if stage == 3 else 1)
    parts.append(Part("weights", int(w), f"{total:,} parameters, {_dtype_words(cfg, dtype)}"
                      + (f", sharded over {shard} processes (ZeRO-3)" if stage == 3 and shard > 1 else ""),
                      "host" if offload_param else "device"))
    frozen = _frozen_copies(cfg, weight_bytes)
    if frozen:
        parts.append(Part(frozen[0], int(frozen[1] / (shard if stage == 3 else 1)), frozen[2]))
    grads = trainable * trainable_dtype_bytes / (shard if stage >= 2 else 1)
    parts.append(Part("gradients", int(grads), f"{trainable:,} trained parameters"
                      + (f", sharded over {shard} (ZeRO-{stage})" if stage >= 2 and shard > 1 else "")))
    opt_bytes, opt_how = _optimizer_bytes(cfg, trainable, trainable_dtype_bytes, ds is not None, on_gpu)
    parts.append(Part("optimizer states", int(opt_bytes / (shard if stage >= 1 else 1)),
                      opt_how + (f", sharded over {shard} (ZeRO-{stage})" if stage >= 1 and shard > 1 else ""),
                      "host" if offload_opt else "device"))

    eager = cfg.model.flash_attn == "disabled"
    n_rows, width = (len(peak_rows), max(peak_rows)) if eager else (1, peak_tokens)  # fused: linear in tokens
    plain = _simulate(cfg, model, n_rows, width, checkpointed=False)
    kept = _simulate(cfg, model, n_rows, width, checkpointed=True)
    per_token = {"saved": (plain or 0.0) / (n_rows * width), "checkpointed": (kept or 0.0) / (n_rows * width)}
    logits, logits_how = _logit_bytes(cfg, model_config, peak_tokens, fused=stage != 3)
    fused = _simulate(cfg, model, 1, peak_tokens, checkpointed=False, attention=SIMULATED_ATTENTION) \
        if eager and not on_gpu and (plain or kept) else plain

    def step_parts(gc: bool) -> list[Part]:
        """activations, logits and (CPU) the allocator's share: the parts checkpointing moves."""
        acts = (kept if gc else plain) or 0.0
        other = kept if not gc else plain
        if (kept if gc else plain) is None:
            acts_how = "not simulated: this model does not run on torch's meta device"
        else:
            acts_how = (f"forward and backward of {n_rows} x {width} tokens simulated "
                        f"({'with' if gc else 'without'} checkpointing"
                        + (f"; {other / MiB:,.0f} MiB {'without' if gc else 'with'} it)" if other else ")"))
        out = [Part("activations", int(acts), acts_how), Part("logits", int(logits), logits_how)]
        if not on_gpu and (plain or kept):
            step = (kept if gc else fused) or 0.0
            # measured: the step's freed memory stays with the process, and the kernels' workspaces add
            # 0.7x the step again; under checkpointing, at least as much as the step without it
            held = max(CPU_RETAINED * (step + logits), (fused or 0.0) + logits if gc else 0.0) - (step + logits)
            out.append(Part("allocator", int(held), "CPU: the step's freed memory that malloc keeps, and the "
                            "kernels' workspaces (measured: 0.7x the step again; benchmarks/plan_bench.py)"))
        return out

    if plain is None and kept is None:
        notes.append("activations: not counted (the model cannot run on the meta device); the total is low")
    runtime, runtime_how = _runtime(on_gpu, steady=memory_only and _ranks() > 1)
    runtime_part = Part("runtime", int(runtime), runtime_how)
    budget = gpu_memory if gpu_memory is not None else cfg.train.device_memory
    available = _available(on_gpu, budget, int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    gc, why = cfg.train.gradient_checkpointing, None
    if gc is None:  # the run's own rule (decide_checkpointing): on only where it would not fit without it
        without = sum(p.bytes for p in [*parts, *step_parts(False), runtime_part] if p.where == "device")
        given = None if budget is None else "gpu_memory" if gpu_memory is not None else "device_memory"
        gc, why = _checkpointing_rule(without, available, given, kept is not None)
        if gc:
            with_it = sum(p.bytes for p in [*parts, *step_parts(True), runtime_part] if p.where == "device")
            why += f"; {with_it / GiB:,.2f} GiB with it"
        notes.append(why)
    parts += [*step_parts(gc), runtime_part]
    examples = rows_total
    mean_tokens = sum(lengths) / max(1, len(lengths))  # of an example (all its sequences)
    per_step = batch * accum * processes
    steps = cfg.train.max_steps if cfg.train.max_steps and cfg.train.max_steps > 0 else \
        math.ceil(cfg.train.num_train_epochs * math.ceil(examples / per_step))
    tokens_per_step = mean_tokens * per_step
    rate, flops, device_flops = (None, None, None) if memory_only or (on_gpu and not torch.cuda.is_available()) \
        else _tokens_per_s(cfg, model, model_config, on_gpu, gc, mean_tokens, notes)
    tokens_per_s = rate * processes if rate else None
    seconds = steps * tokens_per_step / tokens_per_s if tokens_per_s else None
    if on_gpu and not torch.cuda.is_available() and not memory_only:
        notes.append("tokens/s: no GPU here to measure; planned for memory only")

    result = Plan(
        device="GPU" if on_gpu else "CPU", processes=processes,
        engine=engine_name(cfg) or ("DDP" if processes > 1 else "one process"),
        model=f"{type(model).__name__} ({model_config.model_type})", params=total, trainable=trainable,
        dtype=str(dtype).removeprefix("torch."), parts=parts, available=available,
        tokens_per_step=tokens_per_step, peak_step_tokens=peak_tokens, steps=steps,
        tokens_per_s=tokens_per_s, seconds=seconds,
        activation_per_token=per_token, notes=notes, model_flops_per_token=flops, device_flops=device_flops,
        checkpointing=gc, checkpointing_why=why)
    if padded:
        notes.append("batches padded to their longest example (padding_free off or not applicable)")
    result.advice = _advice(cfg, result, kept, stage, on_gpu)
    return result


def _checkpointing_rule(without: int, available: int | None, given: str | None, simulated: bool
                        ) -> tuple[bool, str]:
    """(gradient checkpointing on?, why) for a run that leaves it unset: on only where the plan
    without it does not fit the device's memory (`given`: the key that set it, if one did)."""
    head = "gradient checkpointing"
    if available is None:
        return False, f"{head} off: unset, and the device's memory is unknown (device_memory=GiB)"
    if not simulated:
        return False, f"{head} off: unset, and the activations cannot be estimated for this model"
    where = f"the {available / GiB:,.2f} GiB {f'of {given}' if given else 'of one device'}"
    if without > available:
        return True, f"{head} on (unset: the plan needs {without / GiB:,.2f} GiB without it, more than {where})"
    return False, (f"{head} off (unset: the plan needs {without / GiB:,.2f} GiB without it, within {where}; "
                   "on only where memory needs it)")


def decide_checkpointing(cfg: LatheConfig) -> LatheConfig:
    """The config a training run goes on with: gradient_checkpointing unset -> on only where `lathe
    plan`'s memory estimate of this run does not fit without it (one line in the run summary says
    which and why); set, or not training: as it is. A plan that cannot be made leaves it off."""
    if cfg.train.gradient_checkpointing is not None or not cfg.train.do_train:
        return cfg
    try:
        with _quiet():
            p = make_plan(cfg, memory_only=True)
        on, why = p.checkpointing, p.checkpointing_why or ""
    except Exception as e:  # noqa: BLE001 - the run goes on without it; the line says why
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        on, why = False, f"gradient checkpointing off: unset, and the plan could not be made ({first})"
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_checkpointing=on),
                               notes=(*cfg.notes, why))


def _ranks() -> int:
    """The processes of a run this one belongs to (torchrun's WORLD_SIZE), 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _model_config(cfg: LatheConfig, path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code,
                                          cache_dir=cfg.model.cache_dir, revision=cfg.model.model_revision)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model_name_or_path {cfg.model.model_name_or_path}: its config.json cannot be read "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); point it at "
                         "a model folder or a hub id whose config.json transformers knows") from None


def _dtype(cfg: LatheConfig, on_gpu: bool) -> Any:
    """The dtype the run loads the weights in (model.load.pick_dtype, for the planned device)."""
    import torch

    if cfg.model.torch_dtype != "auto":
        return getattr(torch, cfg.model.torch_dtype)
    if not on_gpu or cfg.finetune.finetuning_type != "lora":
        return torch.float32
    return torch.float16 if cfg.train.fp16 else torch.bfloat16


def _dtype_words(cfg: LatheConfig, dtype: Any) -> str:
    bits = cfg.model.quantization_bit
    base = str(dtype).removeprefix("torch.")
    return f"linear layers in {bits}-bit (QLoRA), the rest {base}" if bits else base


def _meta_model(cfg: LatheConfig, model_config: Any, dtype: Any) -> tuple[Any, int]:
    """The model with the run's method applied, on the meta device (shapes only); and the bytes
    of one trained parameter."""
    import torch

    from lathe.model.adapters import apply_finetuning
    from lathe.model.load import PEFT_TASK_TYPE, auto_class, head_kwargs, stage_task

    task = stage_task(cfg.finetune.stage)
    auto, kwargs = auto_class(task)
    kwargs.update(head_kwargs(cfg))
    if task == "reward":
        kwargs["num_labels"] = 1
    fused = _register_attention()
    model_config._attn_implementation = "eager" if cfg.model.flash_attn == "disabled" else fused
    for k, v in kwargs.items():
        setattr(model_config, k, v)
    from transformers.modeling_utils import set_zero3_state

    try:
        # set_zero3_state: never deepspeed.zero.Init here, even where a ZeRO-3 run earlier in this process left
        # its config live (a sweep, a pipeline): that would partition and gather across the processes, and the
        # plan of a process in a group must not wait for the others
        with torch.device("meta"), _quiet(), set_zero3_state():
            model = auto.from_config(model_config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelError(f"model_name_or_path {cfg.model.model_name_or_path}: {auto.__name__} cannot be built "
                         f"from its config.json ({str(e).splitlines()[0][:160]})") from None
    with _quiet(), torch.device("meta"):
        model = apply_finetuning(model, cfg.finetune, cfg.model, task_type=PEFT_TASK_TYPE.get(task))
    trained = [p for p in model.parameters() if p.requires_grad]
    return model, (trained[0].element_size() if trained else 4)


@contextlib.contextmanager
def _quiet():
    """What the libraries print while the plan builds and runs its shapes-only model."""
    import io
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _weight_bytes(cfg: LatheConfig, model: Any, dtype: Any) -> float:
    """Every parameter once; under QLoRA the body's linear layers at 4 or 8 bits (bitsandbytes:
    a float32 scale per block of 64 weights at 4 bits, per row at 8)."""
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    bits = cfg.model.quantization_bit
    total = 0.0
    seen: set[int] = set()
    quantized = set()
    if bits:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for module in model.modules():
            if type(module) is torch.nn.Linear and module is not out:
                quantized.add(id(module.weight))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quantized:
            total += p.numel() * (0.5 + 4 / 64 if bits == 4 else 1.0) + (p.shape[0] * 4 if bits == 8 else 0)
        elif p.requires_grad:
            total += p.numel() * p.element_size()
        else:
            total += p.numel() * size
    return total


def _frozen_copies(cfg: LatheConfig, weight_bytes: float) -> tuple[str, float, str] | None:
    """What a stage keeps beside the trained model: dpo/kto's reference (a frozen copy for full
    and freeze tuning; an adapter method switches its adapter off instead), ppo's reward model
    and reference."""
    from lathe.model.methods import get_method

    stage = cfg.finetune.stage
    copy = get_method(cfg.finetune.finetuning_type).reference.startswith("a frozen copy")
    if stage in ("dpo", "kto") and (copy or cfg.align.ref_model):
        return "reference model", weight_bytes, "a frozen copy of the starting model (estimated at its size)"
    if stage == "ppo":
        n = 2 if copy else 1
        return "reward + reference", weight_bytes * n, ("the reward model" + (" and a frozen reference" if copy
                                                                               else "") + " (estimated at its size)")
    return None


def _optimizer_bytes(cfg: LatheConfig, trainable: int, size: int, deepspeed: bool, on_gpu: bool
                     ) -> tuple[float, str]:
    optim = str(cfg.train.extra.get("optim", "adamw_torch"))
    if "8bit" in optim:
        per, how = 2.0, "two 8-bit Adam states"
    elif optim.startswith(("sgd", "adafactor", "lomo", "adalomo")):
        per, how = 0.0, f"{optim}: no per-parameter state counted"
    else:
        per, how = 2.0 * size, f"two Adam states ({'float32' if size == 4 else f'{size * 8}-bit'})"
    total = per * trainable
    if deepspeed and size < 4:
        total += 4 * trainable
        how += " + a float32 master copy (DeepSpeed)"
    if on_gpu and per and not deepspeed:
        total += size * trainable  # torch's multi-tensor Adam works on a copy of the update at once
        how += " + the multi-tensor step's workspace"
    return total, f"{how} for {trainable:,} parameters"


def _lengths(cfg: LatheConfig, path: str) -> tuple[list[int], list[int], int, bool]:
    """Tokens of each training example (all its sequences: chosen and rejected ...), as the run
    tokenizes them; of those, the tokens whose activations a backward pass keeps at once
    (`_kept_columns`); a sample of SAMPLE_ROWS rows of a larger dataset; and the rows in all."""
    from lathe.data.loader import load_conversations, load_stage_data, stage_kind
    from lathe.data.templates import get_template
    from lathe.model.load import load_tokenizer

    if cfg.data.streaming:
        raise ConfigError("streaming: true: lathe plan reads the lengths of the examples, which a stream does "
                          "not have up front; plan with streaming: false and max_samples set")
    rows, _stats = load_conversations(cfg.data, stage_kind(cfg.finetune.stage))
    sampled = len(rows) > SAMPLE_ROWS
    data = dataclasses.replace(cfg.data, max_samples=SAMPLE_ROWS) if sampled else cfg.data
    tokenizer = load_tokenizer(cfg.model, path)
    with _quiet():
        split = load_stage_data(cfg.finetune.stage, data, tokenizer, get_template(cfg.data.template),
                                seed=cfg.train.seed)
    train = split.train
    columns = [c for c in train.column_names if c.endswith("input_ids")]
    if not columns:
        raise ConfigError(f"stage {cfg.finetune.stage}: lathe plan does not know this stage's token columns yet")
    sizes = {c: [len(x) for x in train[c]] for c in columns}
    lengths = [sum(per) for per in zip(*sizes.values())]
    if not lengths:
        raise ConfigError("the training split has no examples left after cutoff_len and cleaning; see lathe "
                          "data inspect")
    together = _kept_columns(cfg, columns)
    kept = [max(sum(sizes[c][i] for c in group) for group in together) for i in range(len(lengths))]
    scale = len(rows) / SAMPLE_ROWS if sampled else 1.0
    return lengths, kept, int(round(len(lengths) * scale)), sampled


def _kept_columns(cfg: LatheConfig, columns: list[str]) -> list[list[str]]:
    """The token columns whose activations one backward pass keeps together, as groups (the peak is
    the largest group): dpo's split backward pushes the chosen side, then the rejected one; kto's
    KL rows run without gradient; everything else goes forward and backward at once."""
    stage, extra = cfg.finetune.stage, cfg.train.extra
    split = cfg.align.pref_split_backward and not (extra.get("deepspeed") or extra.get("fsdp"))  # DPOTrainer._can_split
    if stage == "dpo" and split and {"chosen_input_ids", "rejected_input_ids"} <= set(columns):
        return [["chosen_input_ids"], ["rejected_input_ids"]]
    if stage == "kto" and "input_ids" in columns:
        return [["input_ids"]]
    return [columns]


def _peak_step(cfg: LatheConfig, lengths: list[int], batch: int) -> tuple[int, list[int], bool]:
    """Tokens of the micro-batch that holds the longest example (with the mean example beside it):
    the step where a run's memory peaks; and its rows' lengths. Padded batches count the padding;
    padding-free ones are one row under varlen attention, rows as long as the longest under eager."""
    longest = max(lengths)
    mean = sum(lengths) / len(lengths)
    others = max(0, min(batch, len(lengths)) - 1)
    padded = not _padding_free(cfg)
    if cfg.data.packing:
        rows = [cfg.data.cutoff_len] * max(1, batch)
        return sum(rows), rows, False
    if padded:
        width = 8 * math.ceil(longest / 8)
        return width * (others + 1), [width] * (others + 1), True
    tokens = int(longest + others * mean)
    if cfg.model.flash_attn != "disabled":  # varlen attention (FlashAttention, Lathe's over sdpa): one row
        return tokens, [tokens], False
    return tokens, [longest] * max(1, math.ceil(tokens / longest)), False


def _padding_free(cfg: LatheConfig) -> bool:
    from lathe.config.checks import PADDING_FREE_STAGES
    from lathe.model.methods import get_method

    return (cfg.data.padding_free is not False and cfg.finetune.stage in PADDING_FREE_STAGES
            and get_method(cfg.finetune.finetuning_type).packs)


def _num_layers(model_config: Any) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(model_config, key, None), int):
            return getattr(model_config, key)
    return 1


def _simulate(cfg: LatheConfig, model: Any, rows: int, length: int, checkpointed: bool,
              attention: str | None = None) -> float | None:
    """The most memory a training forward and backward of `rows` x `length` tokens holds at once
    (activations, what autograd keeps, the backward's temporaries; not the weights or their
    gradients), simulated on the meta device: every tensor the step creates is counted while it
    lives. None when the model cannot run there."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(base, "gradient_checkpointing_enable", None)
    disable = getattr(base, "gradient_checkpointing_disable", None)
    if checkpointed and (enable is None or disable is None):
        return None
    model.train()
    ids = torch.ones(rows, length, dtype=torch.long, device="meta")
    # a 4D mask as given (made before the count: a real run's mask is a few bytes); the 2D one is
    # inspected with .item(), which meta tensors cannot answer
    mask = torch.zeros(rows, 1, length, length, device="meta")
    attempts = ({"attention_mask": mask, "logits_to_keep": 1}, {"logits_to_keep": 1}, {})
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    was = config._attn_implementation
    try:
        if attention is not None:
            config._attn_implementation = attention
        with _quiet():
            if checkpointed:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for kwargs in attempts:
                counter = _LiveBytes(params)
                try:
                    with counter:
                        out = model(input_ids=ids, **kwargs)
                        first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
                        first.float().sum().backward()
                    return float(counter.peak)
                except Exception:  # an architecture or method meta tensors cannot run: said in the table
                    continue
            return None
    finally:
        config._attn_implementation = was
        if checkpointed:
            disable()
        for p in model.parameters():
            p.grad = None


class _LiveBytes:
    """A dispatch mode that adds up the bytes of the tensors the operators make, until each is
    freed; `peak` is the most at once. Parameters (counted as weights) are left out."""

    def __init__(self, params: set[int]) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                outer.add(out)
                return out

        self.mode = Mode()
        self.params = params
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def add(self, out: Any) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in self.live or key in self.params:
                continue  # a view of a tensor already counted
            self.live[key] = n = t.untyped_storage().nbytes()
            self.now += n
            self.peak = max(self.peak, self.now)
            weakref.finalize(t, self.drop, key)

    def drop(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __enter__(self) -> _LiveBytes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


def _register_attention() -> str:
    """The attention the simulation runs for sdpa and FlashAttention: what their fused kernels
    keep for the backward (queries, keys, values, the output and a log-sum-exp per row), never
    the sequence x sequence scores that eager attention (and sdpa's meta fallback) would."""
    import torch
    from transformers import AttentionInterface

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # batch, positions, heads, dim
            lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
            q, k, v, _out, _lse = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        groups = query.shape[1] // key.shape[1]
        if groups > 1:  # grouped-query attention: the kernels read each key/value head per group
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return Fused.apply(query, key, value), None

    AttentionInterface.register(SIMULATED_ATTENTION, attention)
    return SIMULATED_ATTENTION


SIMULATED_ATTENTION = "lathe_plan_fused"


def _logit_bytes(cfg: LatheConfig, model_config: Any, tokens: int, fused: bool) -> tuple[float, str]:
    """The vocabulary-sized tensors of the loss; `fused`: the fused loss may run (not on ZeRO-3's
    sharded output layer)."""
    from lathe.config.checks import FUSED_LOSS_STAGES
    from lathe.recipes.fused_loss import CHUNK_ELEMENTS

    vocab = getattr(model_config, "vocab_size", 0) or 0
    if cfg.finetune.stage not in ("pt", "sft", "dpo", "kto", "ppo") or not vocab:
        return 0.0, "a task head: no vocabulary-sized output"
    if fused and cfg.finetune.stage in FUSED_LOSS_STAGES and cfg.train.fused_loss is not False \
            and not cfg.finetune.quantization_aware_training:
        rows = min(tokens, max(1, CHUNK_ELEMENTS // vocab))
        return 2.0 * rows * vocab * 4, f"fused loss: one chunk of {rows:,} tokens x {vocab:,} (float32)"
    return float(LOGIT_COPIES * tokens * vocab * 4), (f"{tokens:,} tokens x {vocab:,} vocabulary x {LOGIT_COPIES} "
                                                       "(float32 logits, log-softmax, gradient)")


def _runtime(on_gpu: bool, steady: bool = False) -> tuple[float, str]:
    """What the process holds before the model: the libraries (CPU), or a CUDA context. `steady`: a
    fixed figure on CPU too, so that every process of a run decides alike (decide_checkpointing)."""
    import psutil

    if on_gpu:
        return float(CUDA_CONTEXT), "CUDA context and kernels (typical)"
    if steady:
        return float(CPU_RUNTIME), "torch and the libraries (typical)"
    return float(psutil.Process().memory_info().rss), "torch and the libraries, as this process holds them"


def _available(on_gpu: bool, budget: float | None, processes: int = 1) -> int | None:
    """Bytes one device (one process on CPU, where the processes share the RAM) may use."""
    import psutil
    import torch

    if budget is not None:
        return int(budget * GiB)
    if on_gpu:
        return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    return int(psutil.virtual_memory().total) // max(1, processes)


def _tokens_per_s(cfg: LatheConfig, model: Any, model_config: Any, gpu: bool, gc: bool,
                  mean_tokens: float, notes: list[str]) -> tuple[float, float, float]:
    """(tokens/s of one process: the FLOPs of a token against this device's measured rate x MFU;
    the model FLOPs of a token without recompute; the measured rate)."""
    import torch

    matmul = 0
    frozen_matmul = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            n = weight.numel() if weight is not None else 0
            matmul += n
            if weight is not None and not weight.requires_grad:
                frozen_matmul += n
    trained_matmul = matmul - frozen_matmul
    hidden = getattr(model_config, "hidden_size", 0) or getattr(model_config, "n_embd", 0) or 0
    attention = 4 * _num_layers(model_config) * mean_tokens * hidden  # QK^T and AV, forward
    forward = 2 * matmul + attention
    per_token = forward * (3 if gc else 2) + 2 * trained_matmul + attention
    if gpu:
        dtype = torch.bfloat16
        device = "cuda"
    else:
        dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        device = "cpu"
    rate = _matmul_rate(device, dtype, hidden or 1024)
    notes.append(f"tokens/s: {per_token / 1e6:,.1f} MFLOP per token at {rate / 1e9:,.0f} GFLOP/s measured here "
                 f"x MFU {MFU[device]}")
    return rate * MFU[device] / per_token, forward * 2 + 2 * trained_matmul + attention, rate


def _matmul_rate(device: str, dtype: Any, hidden: int) -> float:
    """FLOP/s of a (2048 x hidden) @ (hidden x 4 hidden) product on this device, over ~0.3 s."""
    import torch

    n = max(64, min(hidden, 8192))
    a = torch.randn(2048, n, device=device, dtype=dtype)
    b = torch.randn(n, 4 * n, device=device, dtype=dtype)
    (a @ b).sum().item()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        (a @ b).sum().item()
        done += 1
    return done * 2 * 2048 * n * 4 * n / (time.perf_counter() - start)


def _advice(cfg: LatheConfig, p: Plan, checkpointed: float | None, stage: int, on_gpu: bool) -> list[str]:
    """What to change, with what it saves, when the plan does not fit."""
    if p.fits is not False:
        return []
    over = p.total - (p.available or 0)
    out = [f"needs {p.total / GiB:,.2f} GiB per device, {over / GiB:,.2f} GiB more than the {p.available / GiB:,.1f} "
           "GiB there; what would help:"]
    parts = {x.name: x.bytes for x in p.parts}
    if not p.checkpointing and checkpointed is not None:
        saves = parts["activations"] - checkpointed
        out.append(f"gradient_checkpointing: true (saves about {saves / GiB:,.2f} GiB, costs a third more compute)")
    if cfg.finetune.finetuning_type in ("full", "freeze"):
        saves = parts["gradients"] + parts["optimizer states"]
        out.append(f"finetuning_type: lora (saves most of the {saves / GiB:,.2f} GiB of gradients and optimizer "
                   "states)")
    elif cfg.finetune.finetuning_type == "lora" and not cfg.model.quantization_bit and on_gpu:
        out.append(f"quantization_bit: 4 (QLoRA: the weights to about {parts['weights'] * 0.3 / GiB:,.2f} GiB)")
    if p.processes > 1 and stage < 3:
        out.append(f"deepspeed: ds_z3 (shards weights, gradients and optimizer states over the {p.processes} "
                   "processes)")
    elif p.processes == 1 and on_gpu:
        out.append("more GPUs with deepspeed: ds_z3 (each holds a share of the model: gpus=N)")
    out.append(f"per_device_train_batch_size: {max(1, cfg.train.per_device_train_batch_size // 2)} with "
               "gradient_accumulation_steps doubled (halves the activations, the same optimisation)")
    return out


# --- the table ---------------------------------------------------------------------------------

def format_plan(p: Plan) -> str:
    def size(n: float) -> str:
        return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / MiB:,.0f} MiB"

    lines = [f"Lathe plan | {p.model} | {p.processes} x {p.device} ({p.engine})",
             f"  parameters {p.params:,}, {p.trainable:,} trained ({100 * p.trainable / max(1, p.params):.2f}%)",
             "",
             f"  {'memory per device':<20} {'':>10}  how"]
    for part in p.parts:
        where = "  (host: offloaded)" if part.where == "host" else ""
        lines.append(f"  {part.name:<20} {size(part.bytes):>10}  {part.how}{where}")
    avail = f" of {size(p.available)}" if p.available else ""
    verdict = {True: "fits", False: "does NOT fit", None: "device memory unknown (gpu_memory=GiB)"}[p.fits]
    lines.append(f"  {'total':<20} {size(p.total):>10}{avail}: {verdict}")
    lines.append("")
    lines.append(f"  steps      {p.steps:,} optimizer steps, {p.tokens_per_step:,.0f} tokens each (mean); the largest "
                 f"micro-batch {p.peak_step_tokens:,} tokens")
    if p.tokens_per_s:
        lines.append(f"  speed      about {p.tokens_per_s:,.0f} tokens/s -> {_duration(p.seconds or 0)} "
                     "(a rough estimate)")
    lines += [f"  note       {n}" for n in p.notes]
    if p.advice:
        lines.append("")
        lines.append(f"  {p.advice[0]}")
        lines += [f"    - {a}" for a in p.advice[1:]]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:,.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:,.0f} min"
    return f"{seconds / 3600:,.1f} h"
