"""Supervised fine-tuning: tokenizer -> data -> model -> trainer -> save."""

from __future__ import annotations

from lathe.config.schema import LatheConfig
from lathe.data.collators import LMCollator
from lathe.data.inspect import mark_trained
from lathe.data.packing import pack_for_training, padding_free_for_training
from lathe.infer import set_stop_tokens
from lathe.model.adapters import apply_finetuning
from lathe.model.load import load_model
from lathe.model.varlen import use_varlen_sdpa
from lathe.recipes.common import (
    RunResult,
    finish_run,
    fused_loss_head,
    install_callbacks,
    lm_trainer,
    open_stage,
    padding_free_wanted,
    print_summary,
    ready_for_training,
    run_eval,
    start_run,
)
from lathe.recipes.predict import run_predict


def run(cfg: LatheConfig) -> RunResult:
    o = open_stage(cfg)
    tokenizer, data, notes = o.tokenizer, o.data, o.notes
    example = next(iter(data.train))  # one example, before packing

    model = load_model(cfg, o.model_path, tokenizer)
    collator = LMCollator(tokenizer.pad_token_id)
    eval_rows = data.eval  # unpacked: predict_with_generate needs each row's own prompt
    if cfg.data.packing or padding_free_wanted(cfg):
        use_varlen_sdpa(model)  # sdpa cut per example: one row of the batch, no padding, no mask
    if cfg.data.packing:  # refuses a model whose attention would cross example boundaries
        data, collator, note = pack_for_training(data, model, tokenizer, cfg.data.cutoff_len,
                                                 cfg.train.per_device_train_batch_size)
        notes.append(note)
    elif padding_free_wanted(cfg):
        free, note = padding_free_for_training(data, model, tokenizer, cfg.data.padding_free,
                                               cfg.train.per_device_train_batch_size)
        collator = free or collator
        notes.append(note)
    if cfg.train.do_train or cfg.model.adapter_name_or_path:  # predicting alone adds no fresh adapter
        model = ready_for_training(apply_finetuning(model, cfg.finetune, cfg.model), cfg)
    fused_head, note = fused_loss_head(cfg, model)
    if note:
        notes.append(note)

    start_run(cfg, o)
    print_summary(cfg, model, o.model_path, data,
                  mark_trained(example["input_ids"], example["labels"], tokenizer, color=False),
                  notes)

    trainer = lm_trainer(model, o.args, tokenizer, data.train, data.eval, collator, fused_head)
    install_callbacks(trainer, cfg)

    train_metrics = {}
    if cfg.train.do_train:
        train_metrics = dict(trainer.train(resume_from_checkpoint=o.resume_from).metrics)
        set_stop_tokens(trainer.model, o.template.stop_token_ids(tokenizer))
        trainer.save_model()
    eval_metrics = run_eval(trainer) if data.eval is not None else None
    predict_metrics = run_predict(trainer, cfg, tokenizer, o.template, eval_rows) \
        if cfg.train.do_predict else {}
    result = finish_run(trainer, cfg, tokenizer, train_metrics, eval_metrics, data.test)
    result.metrics.update(predict_metrics)
    return result


# What `lathe quantize` calibrates on: rows as this stage tokenizes them (its processor), batched.
CALIBRATION = (None, LMCollator)
