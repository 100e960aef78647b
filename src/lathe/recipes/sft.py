"""Supervised fine-tuning: tokenizer -> data -> model -> trainer -> save."""

from __future__ import annotations

from lathe.config.schema import LatheConfig
from lathe.data.inspect import mark_trained
from lathe.data.loader import load_sft_data
from lathe.data.packing import pack_for_training
from lathe.data.templates import check_against_tokenizer, get_template
from lathe.infer import set_stop_tokens
from lathe.model.adapters import apply_finetuning
from lathe.model.load import fix_pad_token, load_model, load_tokenizer, resolve_model_path
from lathe.recipes.common import (
    RunResult,
    check_output_dir,
    finish_run,
    install_callbacks,
    lm_collator,
    lm_trainer,
    open_run,
    print_summary,
    read_rows,
    ready_for_training,
    run_eval,
)
from lathe.recipes.predict import run_predict


def run(cfg: LatheConfig) -> RunResult:
    template = get_template(cfg.data.template)
    resume_from = check_output_dir(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    conversations = read_rows(cfg)  # bad rows are reported before the slow imports

    from transformers import set_seed  # slow: after cheap checks

    set_seed(cfg.train.seed)  # before adapters are created: their init is random too

    tokenizer = load_tokenizer(cfg.model, model_path)
    # the tokenizer's own chat_template disagreeing with `template` means serving will differ
    notes = [n for n in [fix_pad_token(tokenizer), check_against_tokenizer(template, tokenizer)] if n]
    data = load_sft_data(cfg.data, tokenizer, template, seed=cfg.train.seed,
                         conversations=conversations)
    example = next(iter(data.train))  # one example, before packing

    model = load_model(cfg, model_path, tokenizer)
    collator = lm_collator(tokenizer)
    eval_rows = data.eval  # unpacked: predict_with_generate needs each row's own prompt
    if cfg.data.packing:  # refuses a model whose attention would cross example boundaries
        data, collator, note = pack_for_training(data, model, tokenizer, cfg.data.cutoff_len,
                                                 cfg.train.per_device_train_batch_size)
        notes.append(note)
    model = ready_for_training(apply_finetuning(model, cfg.finetune, cfg.model), cfg)

    args = open_run(cfg, has_eval=data.eval is not None, resuming=resume_from is not None)
    print_summary(cfg, model, model_path, data,
                  mark_trained(example["input_ids"], example["labels"], tokenizer, color=False),
                  notes)

    trainer = lm_trainer(model, args, tokenizer, data.train, data.eval, collator)
    install_callbacks(trainer, cfg)

    train_metrics = {}
    if cfg.train.do_train:
        train_metrics = dict(trainer.train(resume_from_checkpoint=resume_from).metrics)
        set_stop_tokens(trainer.model, template.stop_token_ids(tokenizer))
        trainer.save_model()
    eval_metrics = run_eval(trainer) if data.eval is not None else None
    predict_metrics = run_predict(trainer, cfg, tokenizer, template, eval_rows) \
        if cfg.train.do_predict else {}
    result = finish_run(trainer, cfg, tokenizer, train_metrics, eval_metrics)
    result.metrics.update(predict_metrics)
    return result
