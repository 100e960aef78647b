"""Continued pretraining: plain text -> blocks of cutoff_len -> next-token loss on every token.

The data layer already joins documents with eos and cuts them into blocks, so this is
sft without a chat template: the same trainer, collator and outputs, and the
validation loss reported as perplexity.
"""

from __future__ import annotations

from lathe.config.schema import LatheConfig
from lathe.data.loader import load_stage_data
from lathe.data.templates import get_template
from lathe.errors import ConfigError
from lathe.model.adapters import apply_finetuning
from lathe.model.load import fix_pad_token, load_model, load_tokenizer, resolve_model_path
from lathe.recipes.common import (
    RunResult,
    check_output_dir,
    finish_run,
    install_callbacks,
    lm_trainer,
    open_run,
    print_summary,
    read_rows,
    ready_for_training,
    run_eval,
)
from lathe.recipes.predict import check_predict, run_predict


def run(cfg: LatheConfig) -> RunResult:
    if cfg.data.packing:
        raise ConfigError("packing applies to stage sft; stage pt already cuts the text into full "
                          "blocks of cutoff_len, so remove packing")
    check_predict(cfg)  # predict_with_generate: no replies to compare with
    template = get_template(cfg.data.template)  # unused by plain text, but part of the cache key
    resume_from = check_output_dir(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    conversations = read_rows(cfg)  # bad rows are reported before the slow imports

    from transformers import set_seed  # slow: after cheap checks

    set_seed(cfg.train.seed)  # before adapters are created: their init is random too
    tokenizer = load_tokenizer(cfg.model, model_path)
    notes = [n for n in [fix_pad_token(tokenizer)] if n]
    data = load_stage_data("pt", cfg.data, tokenizer, template, seed=cfg.train.seed,
                           conversations=conversations)
    example = next(iter(data.train))

    model = load_model(cfg, model_path, tokenizer)
    model = ready_for_training(apply_finetuning(model, cfg.finetune, cfg.model), cfg)

    args = open_run(cfg, has_eval=data.eval is not None, resuming=resume_from is not None)
    print_summary(cfg, model, model_path, data,
                  tokenizer.decode(example["input_ids"], skip_special_tokens=False), notes,
                  example_caption=f"one block of {len(example['input_ids'])} tokens, all trained")

    trainer = lm_trainer(model, args, tokenizer, data.train, data.eval)
    install_callbacks(trainer, cfg)

    train_metrics = {}
    if cfg.train.do_train:
        train_metrics = dict(trainer.train(resume_from_checkpoint=resume_from).metrics)
        trainer.save_model()
    eval_metrics = run_eval(trainer) if data.eval is not None else None
    predict_metrics = run_predict(trainer, cfg, tokenizer) if cfg.train.do_predict else {}
    result = finish_run(trainer, cfg, tokenizer, train_metrics, eval_metrics)
    result.metrics.update(predict_metrics)
    return result

