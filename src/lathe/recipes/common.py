"""What every recipe shares: the run directory, TrainingArguments, callbacks, summary."""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lathe.config.load import save_config
from lathe.config.schema import LatheConfig
from lathe.distributed import cpu_process_group, deepspeed_path, engine_name, rank, world_size
from lathe.errors import ConfigError, OutputError
from lathe.files import respect_umask
from lathe.integrity import checkpoint_problem


def is_main_process() -> bool:
    """True on global rank 0 (works before and after the process group exists)."""
    return rank() == 0


def log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


@dataclass
class RunResult:
    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def losses(self) -> list[float]:
        """Training losses in the order they were logged."""
        return [h["loss"] for h in self.log_history if "loss" in h]


# --- the run directory --------------------------------------------------------------

def check_output_dir(cfg: LatheConfig) -> str | None:
    """Refuse to clobber a run; return the checkpoint to resume from, if any.

    Runs on every rank before anything is written, so all ranks decide alike.
    """
    out = Path(cfg.train.output_dir)
    resume = cfg.train.resume_from_checkpoint
    if resume:
        if isinstance(resume, str) and resume.lower() not in ("true", "1"):
            problem = checkpoint_problem(Path(resume))
            if problem:
                raise OutputError(f"resume_from_checkpoint: {problem}; point it at a complete "
                                  "checkpoint-N folder (or true for the latest complete one)")
            log(f"Resuming from {resume}")
            return resume
        latest = _latest_to_resume(out)
        log(f"Resuming from {latest} (the latest complete checkpoint in {out})")
        return latest
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file; choose a folder path")
    _check_creatable(out)
    if cfg.train.overwrite_output_dir and out.is_dir():
        _refuse_to_empty(out)
    if out.is_dir() and not cfg.train.overwrite_output_dir:
        held = sorted(p.name for p in out.iterdir())
        if held and held != ["config.yaml"]:  # a config alone: a start that failed, safe to redo
            raise OutputError(
                f"output_dir {out} already holds a run ({', '.join(held[:4])}, ...); choose another "
                "output_dir, or set overwrite_output_dir=true to replace it, or "
                "resume_from_checkpoint=true to continue it"
            )
    return None


def _latest_to_resume(out: Path) -> str:
    """resume_from_checkpoint: true -> the newest complete checkpoint (a newer one cut off
    while saving is passed over, and said so)."""
    numbered = [p for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    found = sorted(numbered, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)
    if not found:
        raise OutputError(
            f"resume_from_checkpoint: true, but {out} holds no checkpoint-N folder; "
            "nothing to resume (drop the key to start a fresh run)"
        )
    problems = []
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if problems:
                log(f"Passing over the newer checkpoint(s) that cannot be resumed: {problems[0]}")
            return str(ckpt)
        problems.append(problem)
    raise OutputError(
        f"resume_from_checkpoint: true, but no checkpoint in {out} is complete ({problems[0]}); "
        "delete the broken checkpoint folders, or drop the key to start again"
    )


def _check_creatable(out: Path) -> None:
    """The folder exists, or its nearest existing parent is a folder we may write in."""
    parent = out
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"output_dir {out} cannot be created: {parent} is a file; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output_dir {out} cannot be written: no permission to write in {parent}; "
                          "choose a folder you own")


def _refuse_to_empty(out: Path) -> None:
    """overwrite_output_dir empties the folder: never the working dir, home, or a parent of them."""
    target = out.resolve()
    protected = {Path.cwd().resolve(), Path.home().resolve(), Path(target.anchor)}
    if target in protected or any(target in p.parents for p in protected):
        raise OutputError(
            f"overwrite_output_dir would empty {out}, which holds your working directory or home; "
            "choose a dedicated run folder such as runs/my-sft"
        )


def prepare_output_dir(cfg: LatheConfig, resuming: bool) -> None:
    """Rank 0 only: empty the folder when asked to overwrite, then save the config."""
    out = Path(cfg.train.output_dir)
    if not is_main_process():
        return
    if cfg.train.overwrite_output_dir and out.is_dir() and not resuming:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"output_dir {out} cannot be created ({e.strerror}); choose another path") from None
    if not resuming:  # a resume rewrites the run's config only once it has trained (finish_run)
        save_config(cfg, out / "config.yaml")


def repeat_target(cfg: LatheConfig, cli_keys: set[str]) -> LatheConfig:
    """`lathe train RUN/config.yaml` repeats a run into a fresh sibling, never over it."""
    from lathe.config.load import replace

    if cfg.source is None or "output_dir" in cli_keys:
        return cfg
    if cfg.train.overwrite_output_dir or cfg.train.resume_from_checkpoint:
        return cfg
    out = Path(cfg.train.output_dir)
    if Path(cfg.source).resolve().parent != out.resolve() or not out.is_dir():
        return cfg
    n = 1
    while Path(f"{out}-repeat{n}").exists():
        n += 1
    new = f"{out}-repeat{n}"
    log(f"Repeating the run in {out} into {new} (the original is left untouched; "
        "give output_dir=... to choose the folder)")
    return replace(cfg, output_dir=new)


# --- TrainingArguments ---------------------------------------------------------------

# Metrics where smaller is better (metric_for_best_model then sets greater_is_better: false).
LOWER_IS_BETTER = {"loss", "mse", "rmse", "mae", "perplexity"}


def build_training_args(cfg: LatheConfig, has_eval: bool, **stage_overrides: Any) -> Any:
    """Lathe's training keys + passthrough fields -> transformers.TrainingArguments."""
    from transformers import TrainingArguments

    args_class = stage_overrides.pop("args_class", TrainingArguments)  # seq2seq: Seq2SeqTrainingArguments
    t = cfg.train
    eval_strategy = t.eval_strategy or ("steps" if has_eval else "no")
    kwargs: dict[str, Any] = dict(
        output_dir=t.output_dir,
        do_train=t.do_train,
        do_eval=has_eval,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        fp16=t.fp16,
        activation_checkpointing=bool(t.gradient_checkpointing),  # unset: lathe.plan.decide_checkpointing
        dataloader_pin_memory=_has_cuda(),
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=eval_strategy if has_eval else "no",
        eval_steps=(t.eval_steps or t.save_steps) if has_eval else None,
        report_to=[] if t.report_to == ["none"] else t.report_to,
        do_predict=t.do_predict,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
    )
    several = world_size() > 1
    deepspeed = t.extra.get("deepspeed")
    if deepspeed:
        kwargs["deepspeed"] = deepspeed_path(deepspeed)  # a preset name -> the shipped file
    if not _has_cuda():
        precision = cpu_precision(t.bf16, t.fp16, cpu_half_support())
        if deepspeed:
            precision.pop("use_cpu", None)  # DeepSpeed casts itself (its bf16/fp16 follow these keys)
        kwargs.update(precision)
        kwargs.update(cpu_process_group(bool(deepspeed), int(t.extra.get("ddp_timeout", 1800))))
    if several:
        # every trainable parameter (adapter, unfrozen block) gets a gradient each step; DDP's
        # search for unused ones only costs time and prints a long warning
        kwargs["ddp_find_unused_parameters"] = False
    kwargs.update(stage_overrides)
    kwargs.update({k: v for k, v in t.extra.items() if k != "deepspeed"})
    if t.early_stopping_steps and not kwargs.get("metric_for_best_model"):
        kwargs["metric_for_best_model"] = "eval_loss"  # what early stopping watches by default
    best = str(kwargs.get("metric_for_best_model") or "")
    if best and "greater_is_better" not in t.extra and best.removeprefix("eval_") in LOWER_IS_BETTER:
        kwargs["greater_is_better"] = False  # transformers assumes higher is better unless "loss"
    try:
        return args_class(**kwargs)
    except (ValueError, TypeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the training keys do not fit together: {first}") from None


def cpu_half_support() -> dict[str, bool]:
    """Which half-precision types this CPU computes natively (oneDNN: AVX512-BF16 / AMX)."""
    import torch

    ops = torch.ops.mkldnn
    return {"bf16": bool(ops._is_mkldnn_bf16_supported()), "fp16": bool(ops._is_mkldnn_fp16_supported())}


def cpu_precision(bf16: bool, fp16: bool, native: dict[str, bool]) -> dict[str, Any]:
    """Mixed precision without a GPU: autocast on the CPU where it computes that type
    natively (TrainingArguments then needs use_cpu); elsewhere it would run many times
    slower than float32 (bf16 measured 13x on an AVX2 CPU), so it is refused in one line."""
    for key, wanted in (("bf16", bf16), ("fp16", fp16)):
        if not wanted:
            continue
        if not native[key]:
            raise ConfigError(
                f"{key}: true needs a CUDA GPU or a CPU with native {key} (AVX512-BF16 / AMX); "
                f"this machine has neither, and emulated {key} trains many times slower than float32; "
                f"set {key}: false here (the same config keeps {key} on a GPU machine)"
            )
        return {"use_cpu": True}
    return {}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- callbacks -------------------------------------------------------------------------

# Eval log keys that are bookkeeping, not results (left out of the progress bar's eval line).
_EVAL_PLUMBING = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                  "eval_model_preparation_time"}


def make_callbacks(output_dir: str, perplexity: bool = True) -> list[Any]:
    """perplexity=False for stages whose eval loss is not a language-model loss (rm, dpo...)."""
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        """One bar with loss, learning rate and tokens/s; eval results printed above it."""

        def __init__(self) -> None:
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                            unit="step", dynamic_ncols=True)
            self.t0, self.tokens0 = time.time(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is None or not logs:
                return
            if "loss" in logs:
                elapsed = max(time.time() - self.t0, 1e-9)
                tok_s = (state.num_input_tokens_seen - self.tokens0) / elapsed
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                     lr=f"{logs.get('learning_rate', 0):.2e}",
                                     tok_s=f"{tok_s:,.0f}")
            if "eval_loss" in logs:
                shown = [f"loss {logs['eval_loss']:.4f}"]
                if perplexity:
                    shown.append(f"perplexity {_ppl(logs['eval_loss']):.2f}")
                shown += [f"{k[5:]} {v:.4f}" for k, v in logs.items()
                          if k.startswith("eval_") and k not in _EVAL_PLUMBING and isinstance(v, float)]
                self.bar.write(f"eval @ step {state.global_step}: {', '.join(shown)}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    class JsonlLog(TrainerCallback):
        """Every log line, as JSON, in output_dir/trainer_log.jsonl (rank 0)."""

        def __init__(self) -> None:
            self.t0 = time.time()  # also when there is no training (do_train: false)

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "max_steps": state.max_steps,
                      "epoch": round(state.epoch or 0.0, 4),
                      "elapsed_s": round(time.time() - self.t0, 2), **logs}
            with open(Path(output_dir) / "trainer_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    class Modes(TrainerCallback):
        """Checkpoints readable like the rest of the run (safetensors writes 0600)."""

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                respect_umask(Path(output_dir) / f"checkpoint-{state.global_step}")

    return [ProgressBar(), JsonlLog(), Modes()]


_EXTRA_CALLBACKS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("lathe_extra_callbacks",
                                                                                  default=())


@contextlib.contextmanager
def extra_callbacks(*callbacks: Any) -> Iterator[None]:
    """TrainerCallbacks every run started inside the block also gets (lathe tune's report of each
    evaluation to its study): a verb above the recipes hands them in without a global."""
    token = _EXTRA_CALLBACKS.set(_EXTRA_CALLBACKS.get() + callbacks)
    try:
        yield
    finally:
        _EXTRA_CALLBACKS.reset(token)


def install_callbacks(trainer: Any, cfg: LatheConfig, perplexity: bool = True) -> None:
    """Our progress bar and JSONL log instead of transformers' printing; early stopping
    when `early_stopping_steps` is set; the callbacks of an enclosing `extra_callbacks`."""
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lathe.model.methods import get_method

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    method = get_method(cfg.finetune.finetuning_type)
    if method.prepare_trainer is not None:  # its callbacks (before ours: they log), its optimizer groups
        method.prepare_trainer(trainer, cfg)
    for cb in make_callbacks(cfg.train.output_dir, perplexity):
        trainer.add_callback(cb)
    if cfg.train.early_stopping_steps:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_steps))
    if cfg.finetune.quantization_aware_training and cfg.train.do_train:
        trainer.add_callback(fake_quantization(trainer.model, cfg))
    for cb in _EXTRA_CALLBACKS.get():
        trainer.add_callback(cb)


def fake_quantization(model: Any, cfg: LatheConfig) -> Any:
    """QAT: the model's layers round as quantization_scheme will (from now: a resumed checkpoint
    loads into the same parametrized layers it was saved from), until training ends (then the
    float weights are what the run saves)."""
    from transformers import TrainerCallback

    from lathe.model.quant.qat import FakeQuantization

    q = cfg.quantize
    fq = FakeQuantization(q.quantization_scheme, q.quantization_group_size, q.quantization_skip_modules)
    n = fq.apply(model)
    log(f"Quantization-aware training: {n} layers train through {q.quantization_scheme} rounding")

    class EndFakeQuantization(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            fq.remove()

    return EndFakeQuantization()


def _ppl(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# --- the summary at start ---------------------------------------------------------------

def print_summary(cfg: LatheConfig, model: Any, model_path: str, data: Any, example: str,
                  notes: list[str], example_caption: str = "trained tokens marked") -> None:
    if not is_main_process():
        return
    from lathe.model.adapters import count_parameters

    trainable, total = count_parameters(model)
    param = next(model.parameters())
    st = data.stats
    world = world_size()
    rows = ", ".join(f"{k}: {v}" for k, v in st.rows_read.items())
    lines = [
        f"Lathe | stage {cfg.finetune.stage} | {cfg.finetune.finetuning_type}",
        f"  model      {model_path} ({_model_kind(model)})",
        f"  weights    {param.dtype} on {param.device}, {world} process(es)"
        + (f" ({engine})" if (engine := engine_name(cfg)) else "")
        + (f", {'bf16' if cfg.train.bf16 else 'fp16'} mixed precision (autocast)"
           if cfg.train.bf16 or cfg.train.fp16 else ""),
        f"  params     {total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.4f}%)",
        f"  data       {rows} rows -> train {st.train_rows}, eval {st.eval_rows}"
        + (f", test {st.test_rows}" if st.test_rows else "") + (f" ({st.split})" if st.split else "") + "; "
        f"{st.dropped_empty_response} dropped (no response left within cutoff_len={cfg.data.cutoff_len})"
        if not cfg.data.streaming else
        f"  data       streamed from {', '.join(cfg.data.dataset or [])} (sizes unknown until read)",
        f"  tokens     {st.train_tokens:,} in training rows"
        + (f", {st.trained_tokens:,} trained" if st.trained_tokens else "")
        + f" (tokenized data: cache {st.cache})",
        f"  output     {cfg.train.output_dir}",
    ]
    if cfg.model.quantization_bit:
        m = cfg.model
        kind = f"4-bit {m.quantization_type}" + (", double quantization" if m.double_quantization else "") \
            if m.quantization_bit == 4 else "8-bit"
        trained = next((p.dtype for p in model.parameters() if p.requires_grad), param.dtype)
        lines.insert(3, f"  quantized  base in {kind} (bitsandbytes), LoRA trained in {trained}")
    if st.cleaning:
        lines.append("  cleaning   " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in st.cleaning.items()))
    if st.augmented_rows:
        lines.append(f"  augmented  {st.augmented_rows} of the {st.train_rows} training rows are augmented copies "
                     f"({st.augmented_rows / max(1, st.train_rows):.0%}; {', '.join(cfg.data.augment or [])})")
    lines += [f"  note       {n}" for n in [*cfg.notes, *notes]]
    lines += [f"  example    ({example_caption})", _indent(example, "    ")]
    print("\n".join(lines), flush=True)


def _model_kind(model: Any) -> str:
    """The model class, and the adapter on it: `LlamaForSequenceClassification + LORA adapter`."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        kinds = sorted({str(getattr(c.peft_type, "value", c.peft_type)) for c in model.peft_config.values()})
        return f"{type(model.get_base_model()).__name__} + {'/'.join(kinds)} adapter"
    return type(model).__name__


def _indent(text: str, pad: str) -> str:
    return "\n".join(pad + line for line in text.splitlines())


def save_run_outputs(trainer: Any, cfg: LatheConfig, train_metrics: dict[str, Any],
                     eval_metrics: dict[str, Any] | None) -> None:
    """trainer_state.json, train/eval/all_results.json and, if asked, the loss plots."""
    if train_metrics:  # none when do_train is false
        trainer.save_metrics("train", train_metrics)
    if eval_metrics:
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    if cfg.finetune.plot_loss and trainer.is_world_process_zero():
        from lathe.recipes.plots import plot_losses

        for path in plot_losses(cfg.train.output_dir, trainer.state.log_history):
            log(f"Saved {path}")


# --- the steps every recipe takes, in order ---------------------------------------------

def read_rows(cfg: LatheConfig) -> tuple[list[dict], Any] | None:
    """The stage's rows, converted and validated before the slow imports, so bad rows
    are reported at once (a stream: its first rows are checked and None returned)."""
    from lathe.data.loader import check_streamed, load_conversations, stage_kind

    kind = stage_kind(cfg.finetune.stage)
    if cfg.data.streaming:
        check_streamed(cfg.data, kind)
        return None
    return load_conversations(cfg.data, kind)


def ready_for_training(model: Any, cfg: LatheConfig) -> Any:
    """Adapters need grads flowing into checkpointed blocks."""
    if cfg.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


@dataclass
class Opening:
    """What every stage starts from (`open_stage`)."""

    template: Any
    resume_from: str | None  # the checkpoint to resume, if any
    model_path: str  # model_name_or_path, resolved to a folder
    tokenizer: Any
    data: Any  # the stage's tokenized splits (SplitData)
    notes: list[str]  # lines for the run summary
    args: Any  # TrainingArguments (None for a stage with its own loop)
    task: Any = None  # what a task stage decided from the rows (e.g. its label set)


def open_stage(cfg: LatheConfig, *, check_template: bool = True, training_args: bool = True,
               task: Callable[[list[dict] | None, Any], tuple[Any, Any]] | None = None,
               args_kwargs: dict[str, Any] | None = None) -> Opening:
    """The opening every stage shares, in the one order its rules need: the cheap checks (the
    template name, the output folder, the model path, every row) before the slow imports; the
    seed before anything random is made (adapters, heads); the data; then TrainingArguments,
    before the model is loaded (DeepSpeed ZeRO-3 shards a model at load time only when they
    exist). Nothing is written yet: the run directory is made by `start_run`, after the model
    loaded, so a model that fails to load leaves no folder behind.

    `task` (task stages): (training rows, tokenizer) -> (a TaskProcessor, what it decided),
    called once the rows are read and checked (e.g. the label set of a classifier);
    `args_kwargs`: the stage's own TrainingArguments fields (args_class: another class)."""
    from lathe.data.loader import load_stage_data
    from lathe.data.templates import check_against_tokenizer, get_template
    from lathe.model.load import (
        check_task_head,
        fix_pad_token,
        load_tokenizer,
        resolve_model_path,
        stage_task,
    )

    template = get_template(cfg.data.template)
    resume_from = check_output_dir(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.model_revision, cfg.model.cache_dir)
    conversations = read_rows(cfg)  # bad rows are reported before the slow imports
    check_task_head(model_path, stage_task(cfg.finetune.stage), cfg.finetune.stage, cfg.model.trust_remote_code)

    from transformers import set_seed  # slow: after the cheap checks

    set_seed(cfg.train.seed)  # before adapters and heads are created: their init is random too
    tokenizer = load_tokenizer(cfg.model, model_path)
    # the tokenizer's own chat_template disagreeing with `template` means serving will differ
    notes = [fix_pad_token(tokenizer), check_against_tokenizer(template, tokenizer) if check_template else None]
    processor, decided = task(conversations[0] if conversations else None, tokenizer) if task else (None, None)
    data = load_stage_data(cfg.finetune.stage, cfg.data, tokenizer, template, seed=cfg.train.seed,
                           conversations=conversations, task=processor)
    args = build_training_args(cfg, has_eval=data.eval is not None, **(args_kwargs or {})) if training_args else None
    return Opening(template, resume_from, model_path, tokenizer, data, [n for n in notes if n], args, decided)


def start_run(cfg: LatheConfig, opening: Opening) -> None:
    """The run directory (rank 0: emptied when overwriting, config.yaml saved); every rank waits."""
    prepare_output_dir(cfg, resuming=opening.resume_from is not None)
    if opening.args is not None and opening.args.distributed_state is not None:
        opening.args.distributed_state.wait_for_everyone()


def lm_trainer(model: Any, args: Any, tokenizer: Any, train: Any, eval_data: Any = None,
               collator: Any = None, fused_head: Any = None) -> Any:
    """The stock Trainer for causal-LM stages (pt, sft): the model's own loss, which the
    Trainer normalises over the trained tokens of the whole accumulated batch
    (num_items_in_batch), so gradient accumulation equals one big batch; with `fused_head`
    (`fused_loss_head`), the same loss with the output layer fused into it."""
    from transformers import Trainer

    from lathe.data.collators import LMCollator

    kwargs = dict(model=model, args=args, train_dataset=train, eval_dataset=eval_data,
                  processing_class=tokenizer, data_collator=collator or LMCollator(tokenizer.pad_token_id))
    if fused_head is None:
        return Trainer(**kwargs)
    from lathe.recipes.fused_loss import FusedLossTrainer

    return FusedLossTrainer(**kwargs, fused_head=fused_head)


def padding_free_wanted(cfg: LatheConfig) -> bool:
    """padding_free true, or unset with a method that keeps position ids (not prefix / P-tuning /
    prompt tuning, whose virtual tokens make peft drop them)."""
    from lathe.model.methods import get_method

    if cfg.data.padding_free is None:
        return get_method(cfg.finetune.finetuning_type).packs
    return cfg.data.padding_free


def padding_free_pairs(cfg: LatheConfig, data: Any, models: tuple[Any, ...], tokenizer: Any, notes: list[str],
                       **kwargs: Any) -> Any | None:
    """dpo's, kto's and rm's padding-free collator (lathe.data.packing.padding_free_pairs_for_training;
    `kwargs`: its labels / kind) where padding_free_wanted and the probe passes, else None; the given
    models (policy, reference) switched to Lathe's varlen sdpa first, the summary's line added to `notes`."""
    if not padding_free_wanted(cfg):
        return None
    from lathe.data.packing import padding_free_pairs_for_training
    from lathe.model.varlen import use_varlen_sdpa

    for m in models:  # sdpa cut per example: each side of the batch in one row
        if m is not None:
            use_varlen_sdpa(m)
    collator, note = padding_free_pairs_for_training(data, models[0], tokenizer, cfg.data.padding_free,
                                                     cfg.train.per_device_train_batch_size, **kwargs)
    notes.append(note)
    return collator


def fused_loss_head(cfg: LatheConfig, model: Any) -> tuple[Any, str | None]:
    """(the output layer the fused loss reads, or None; a line for the summary). `fused_loss`
    unset: fused where the probe reproduces the model's own loss; true: that, or one line."""
    if cfg.train.fused_loss is False or not cfg.train.do_train:
        return None, None
    from lathe.recipes.fused_loss import CHUNK_ELEMENTS, output_layer, probe

    head = output_layer(model)
    why = None
    if cfg.train.extra.get("use_liger_kernel"):
        why = "Liger's kernels (use_liger_kernel) fuse the loss themselves"
    elif cfg.finetune.quantization_aware_training:
        why = "quantization-aware training rounds what the output layer reads, which the fusion would skip"
    elif head is None:
        why = "the output layer is not a plain Linear without bias (LoRA on it, quantized, or sharded by ZeRO-3)"
    elif probe(model, head, head.weight.shape[0]) is None:
        why = f"{type(model).__name__}'s own loss is not reproduced by it (a logit scale or cap after the output layer)"
    if why is not None:
        if cfg.train.fused_loss:
            raise ConfigError(f"fused_loss: true, but {why}; set fused_loss: false")
        return None, f"fused loss off: {why}"
    rows = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    return head, (f"fused loss: the output layer and cross-entropy {rows} tokens at a time, trained positions "
                  "only; the batch's logits never exist whole")


def mean_loss_trainer(**kwargs: Any) -> Any:
    """The stock Trainer for a model whose own loss is a mean over its micro-batch of examples
    (a classifier: every example weighs the same, so equal micro-batches average to the batch's
    mean). Transformers takes any model whose forward has **kwargs for one that
    normalises by the whole accumulated batch, and then neither divides its loss by
    gradient_accumulation_steps nor leaves it unscaled across processes: the logged loss and
    the gradients came out gradient_accumulation_steps x processes too large. Said otherwise here."""
    from transformers import Trainer

    trainer = Trainer(**kwargs)
    trainer.model_accepts_loss_kwargs = False
    return trainer


def token_loss_trainer(trainer_class: Any = None, **kwargs: Any) -> Any:
    """The stock Trainer (or `trainer_class`) for a model whose loss is per labelled token (a
    tagger, a seq2seq model), computed by Lathe from the logits: the cross-entropy summed over
    the labelled tokens and divided by the labelled tokens of the whole accumulated batch over
    every process (the Trainer counts them: num_items_in_batch). Gradient accumulation and
    several processes then train as one batch of that size; the model's own loss (a mean over
    its micro-batch) would weigh each micro-batch equally, and transformers would scale it by
    the processes and not by the accumulation (it takes any forward with **kwargs for one that
    normalises by the whole batch)."""
    if trainer_class is None:
        from transformers import Trainer as trainer_class
    return trainer_class(**kwargs, compute_loss_func=token_mean_loss)


def token_mean_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Cross-entropy over the labelled tokens (label -100: none), summed, over
    `num_items_in_batch` (the whole batch's labelled tokens), or its mean without it."""
    import torch.nn.functional as F

    logits = outputs["logits"]
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum().clamp(min=1)
    return total / count


def final_eval(trainer: Any) -> dict[str, float] | None:
    """The evaluation the trainer already ran at the last step, if any (no second pass).
    Not when the best checkpoint was loaded at the end: that model needs its own."""
    state = trainer.state
    best = state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and not best.endswith(f"-{state.global_step}"):
        return None
    last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    if last is None or last.get("step") != state.global_step:
        return None
    return {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}


def run_eval(trainer: Any, perplexity: bool = True) -> dict[str, float]:
    """Validation metrics after training; perplexity = exp(eval_loss) for language models."""
    metrics = final_eval(trainer) or trainer.evaluate()
    shown = [f"loss {metrics['eval_loss']:.4f}"]
    if perplexity:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    shown += [f"{k[5:]} {v:.4f}" for k, v in metrics.items()
              if k.startswith("eval_") and k not in _EVAL_PLUMBING and isinstance(v, float)]
    log("Eval " + ", ".join(shown))
    return metrics


def run_test(trainer: Any, test: Any, perplexity: bool = True) -> dict[str, float]:
    """The test set, once, on the model training chose (the best checkpoint where
    load_best_model_at_end): test_results.json, apart from the validation figures."""
    metrics = trainer.evaluate(eval_dataset=test, metric_key_prefix="test")
    if perplexity and "test_loss" in metrics:
        metrics["test_perplexity"] = math.exp(min(metrics["test_loss"], 50.0))
    shown = [f"{k[5:]} {v:.4f}" for k, v in metrics.items()
             if k.startswith("test_") and k[5:] not in _TEST_PLUMBING and isinstance(v, float)]
    log(f"Test ({len(test)} rows, evaluated once) " + ", ".join(shown))
    trainer.save_metrics("test", metrics)
    return metrics


_TEST_PLUMBING = {"runtime", "samples_per_second", "steps_per_second", "model_preparation_time"}


def finish_run(trainer: Any, cfg: LatheConfig, tokenizer: Any, train_metrics: dict[str, Any],
               eval_metrics: dict[str, Any] | None, test: Any = None, perplexity: bool = True) -> RunResult:
    """The test set's one evaluation (`test`: the split data's test rows, if any);
    train/eval/test/all_results.json, trainer_state.json and the plots; the RunResult."""
    from lathe.model.methods import get_method

    scored = test is not None and (cfg.train.do_train or cfg.train.do_eval)  # not again by lathe predict
    test_metrics = run_test(trainer, test, perplexity) if scored else {}
    method = get_method(cfg.finetune.finetuning_type)
    if cfg.train.do_train and method.after_training is not None:
        said = method.after_training(trainer, cfg)  # e.g. PiSSA's conversion: after the test
        if said:
            log(f"Note: {said}")
    save_run_outputs(trainer, cfg, train_metrics, eval_metrics)
    if trainer.is_world_process_zero():
        if cfg.train.resume_from_checkpoint:
            save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")  # the resume succeeded
        respect_umask(cfg.train.output_dir)
    metrics = {**train_metrics, **(eval_metrics or {}), **test_metrics}
    if cfg.train.do_train:
        log(f"Saved {cfg.finetune.finetuning_type} weights, tokenizer and config to {cfg.train.output_dir}")
    else:  # evaluate / predict only: nothing was trained, so no weights were written
        log(f"Saved the results (no weights: do_train is false) to {cfg.train.output_dir}")
    return RunResult(cfg.train.output_dir, metrics, trainer.model, tokenizer,
                     list(trainer.state.log_history))
