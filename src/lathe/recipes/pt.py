"""Continued pretraining: plain text -> blocks of cutoff_len -> next-token loss on every token.

The data layer already joins documents with eos and cuts them into blocks, so this is
sft without a chat template: the same trainer, collator and outputs, and the
validation loss reported as perplexity.
"""

from __future__ import annotations

from lathe.config.schema import LatheConfig
from lathe.data.collators import LMCollator
from lathe.errors import ConfigError
from lathe.model.adapters import apply_finetuning
from lathe.model.load import load_model
from lathe.recipes.common import (
    RunResult,
    finish_run,
    fused_loss_head,
    install_callbacks,
    lm_trainer,
    open_stage,
    print_summary,
    ready_for_training,
    run_eval,
    start_run,
)
from lathe.recipes.predict import check_predict, run_predict


def run(cfg: LatheConfig) -> RunResult:
    if cfg.data.packing:
        raise ConfigError("packing applies to stage sft; stage pt already cuts the text into full "
                          "blocks of cutoff_len, so remove packing")
    check_predict(cfg)  # predict_with_generate: no replies to compare with
    o = open_stage(cfg, check_template=False)  # plain text: the template only keys the cache
    tokenizer, data = o.tokenizer, o.data
    example = next(iter(data.train))

    model = load_model(cfg, o.model_path, tokenizer)
    if cfg.train.do_train or cfg.model.adapter_name_or_path:  # predicting alone adds no fresh adapter
        model = ready_for_training(apply_finetuning(model, cfg.finetune, cfg.model), cfg)
    fused_head, note = fused_loss_head(cfg, model)
    if note:
        o.notes.append(note)

    start_run(cfg, o)
    print_summary(cfg, model, o.model_path, data,
                  tokenizer.decode(example["input_ids"], skip_special_tokens=False), o.notes,
                  example_caption=f"one block of {len(example['input_ids'])} tokens, all trained")

    trainer = lm_trainer(model, o.args, tokenizer, data.train, data.eval, fused_head=fused_head)
    install_callbacks(trainer, cfg)

    train_metrics = {}
    if cfg.train.do_train:
        train_metrics = dict(trainer.train(resume_from_checkpoint=o.resume_from).metrics)
        trainer.save_model()
    eval_metrics = run_eval(trainer) if data.eval is not None else None
    predict_metrics = run_predict(trainer, cfg, tokenizer) if cfg.train.do_predict else {}
    result = finish_run(trainer, cfg, tokenizer, train_metrics, eval_metrics, data.test)
    result.metrics.update(predict_metrics)
    return result


# What `lathe quantize` calibrates on: rows as this stage tokenizes them (its processor), batched.
CALIBRATION = (None, LMCollator)
