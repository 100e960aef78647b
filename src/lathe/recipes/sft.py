"""Supervised fine-tuning: tokenizer -> data -> model -> trainer -> save."""

from __future__ import annotations

import math

from lathe.config.schema import LatheConfig
from lathe.data.inspect import mark_trained
from lathe.data.loader import check_streamed, load_conversations, load_sft_data
from lathe.data.packing import PAD_MULTIPLE, pack_for_training
from lathe.data.templates import check_against_tokenizer, get_template
from lathe.model.adapters import apply_finetuning
from lathe.model.load import fix_pad_token, load_model, load_tokenizer, resolve_model_path
from lathe.recipes.common import (
    RunResult,
    build_training_args,
    check_output_dir,
    install_callbacks,
    log,
    prepare_output_dir,
    print_summary,
    save_run_outputs,
)


def run(cfg: LatheConfig) -> RunResult:
    template = get_template(cfg.data.template)
    resume_from = check_output_dir(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    # Bad rows are reported before the slow imports (a stream: its first rows are checked).
    conversations = None if cfg.data.streaming else load_conversations(cfg.data)
    if cfg.data.streaming:
        check_streamed(cfg.data, "sft")

    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed  # slow: after cheap checks

    set_seed(cfg.train.seed)  # before adapters are created: their init is random too

    tokenizer = load_tokenizer(cfg.model, model_path)
    # the tokenizer's own chat_template disagreeing with `template` means serving will differ
    notes = [n for n in [fix_pad_token(tokenizer), check_against_tokenizer(template, tokenizer)] if n]
    data = load_sft_data(cfg.data, tokenizer, template, seed=cfg.train.seed,
                         conversations=conversations)
    example = next(iter(data.train))  # one example, before packing

    model = load_model(cfg, model_path, tokenizer)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                      pad_to_multiple_of=PAD_MULTIPLE)
    if cfg.data.packing:  # refuses a model whose attention would cross example boundaries
        data, collator, note = pack_for_training(data, model, tokenizer, cfg.data.cutoff_len,
                                                 cfg.train.per_device_train_batch_size)
        notes.append(note)
    model = apply_finetuning(model, cfg.finetune, cfg.model)
    if cfg.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # adapters need grads flowing into checkpointed blocks

    args = build_training_args(cfg, has_eval=data.eval is not None)
    prepare_output_dir(cfg, resuming=resume_from is not None)
    args_state = args.distributed_state
    if args_state is not None:
        args_state.wait_for_everyone()

    print_summary(cfg, model, model_path, data,
                  mark_trained(example["input_ids"], example["labels"], tokenizer, color=False),
                  notes)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        data_collator=collator,
    )
    install_callbacks(trainer, cfg.train.output_dir)

    metrics: dict[str, float] = {}
    train_metrics = {}
    if cfg.train.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        train_metrics = dict(result.metrics)
        _set_stop_tokens(trainer.model, template.stop_token_ids(tokenizer))
        trainer.save_model()
    eval_metrics = None
    if data.eval is not None:
        eval_metrics = _final_eval(trainer) or trainer.evaluate()
        eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        log(f"Eval loss {eval_metrics['eval_loss']:.4f}, perplexity {eval_metrics['eval_perplexity']:.2f}")
    save_run_outputs(trainer, cfg, train_metrics, eval_metrics)
    metrics.update(train_metrics)
    metrics.update(eval_metrics or {})
    log(f"Saved {cfg.finetune.finetuning_type} weights, tokenizer and config to {cfg.train.output_dir}")
    return RunResult(cfg.train.output_dir, metrics, trainer.model, tokenizer,
                     list(trainer.state.log_history))


def _final_eval(trainer) -> dict[str, float] | None:
    """The evaluation the trainer already ran at the last step, if any (no second pass)."""
    state = trainer.state
    last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    if last is None or last.get("step") != state.global_step:
        return None
    return {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}


def _set_stop_tokens(model, stop_ids: list[int]) -> None:
    """Generation stops at the template's stop words, not only at eos."""
    gen = getattr(model, "generation_config", None)
    if gen is not None and stop_ids:
        gen.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
