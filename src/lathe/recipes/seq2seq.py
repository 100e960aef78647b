"""Sequence to sequence on an encoder-decoder (T5, BART, mT5, Marian ...): source -> target.

Rows have a source and a target text (or are alpaca rows: the prompt is the source, the
response the target). The source (after source_prefix) is cut to cutoff_len tokens, the
target to max_target_length. The model is the checkpoint as AutoModelForSeq2SeqLM with its
own cross-entropy loss over the target; a model without a decoder (GPT-2, BERT) is refused
before loading.

Evaluation generates every eval row's target in batches (Seq2SeqTrainer; greedy unless
do_sample is set, max_new_tokens, num_beams) and scores it against the reference: BLEU-4
and ROUGE-1/2/L (lathe.eval.metrics, in percent), so metric_for_best_model: bleu-4 or
rouge-l chooses the checkpoint. do_predict (or `lathe predict`) writes each row's source,
generated text and reference.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.collators import Seq2SeqCollator
from lathe.data.loader import TaskProcessor
from lathe.data.processors import IGNORE_INDEX
from lathe.data.tasks import make_seq2seq_preprocess
from lathe.eval.metrics import generation_scores
from lathe.recipes.common import (
    RunResult,
    is_main_process,
    log,
    open_stage,
    print_summary,
    start_run,
    token_loss_trainer,
)
from lathe.recipes.heads import build_task_model, finish, fit, refuse_packing, refuse_streaming

PREDICTIONS_FILE = "predictions.jsonl"


def run(cfg: LatheConfig) -> RunResult:
    from transformers import Seq2SeqTrainingArguments

    refuse_packing(cfg)
    o = open_stage(cfg, check_template=False, task=partial(processor, cfg),
                   args_kwargs={"args_class": Seq2SeqTrainingArguments, "predict_with_generate": True,
                                "generation_max_length": cfg.generate.max_new_tokens + 1})
    tokenizer, data, notes = o.tokenizer, o.data, o.notes

    model = build_task_model(cfg, o.model_path, tokenizer, "seq2seq", {})
    set_generation(model, cfg)
    start_run(cfg, o)
    print_summary(cfg, model, o.model_path, data, show_row(next(iter(data.train)), cfg.task.source_prefix), notes,
                  example_caption="source -> target")

    trainer = build_trainer(model, o.args, tokenizer, data.train, data.eval)
    train_metrics, eval_metrics = fit(trainer, cfg, o.resume_from, data.eval is not None)
    predict_metrics = predict(trainer, data.eval, tokenizer, cfg.train.output_dir) \
        if cfg.train.do_predict and data.eval is not None else {}
    return finish(trainer, cfg, tokenizer, train_metrics, eval_metrics, predict_metrics, data.test)


def processor(cfg: LatheConfig, rows: list[dict] | None, tokenizer: Any) -> tuple[TaskProcessor, None]:
    refuse_streaming(cfg, rows, "tokenizes every row before training")
    t = cfg.task
    return TaskProcessor(make_seq2seq_preprocess(tokenizer, cfg.data.cutoff_len, t.max_target_length,
                                                 t.source_prefix),
                         json.dumps([t.max_target_length, t.source_prefix])), None


def set_generation(model: Any, cfg: LatheConfig) -> None:
    """How evaluation and predict generate: greedy (or beams) unless do_sample is set, so the
    scores of two evaluations compare; max_new_tokens and num_beams from the config."""
    g = cfg.generate
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen = base.generation_config
    # an encoder-decoder's max_length counts decoder tokens only: the start token + max_new_tokens
    # (one limit, not two that transformers warns about on every evaluation)
    gen.max_new_tokens, gen.max_length = None, g.max_new_tokens + 1
    gen.num_beams = g.num_beams
    gen.do_sample = g.do_sample if cfg.is_set("do_sample") else False
    if gen.do_sample:
        gen.temperature, gen.top_p, gen.top_k = g.temperature, g.top_p, g.top_k or None
    if g.repetition_penalty != 1.0:
        gen.repetition_penalty = g.repetition_penalty


def show_row(row: dict[str, Any], prefix: str | None = None) -> str:
    def cut(text: str) -> str:
        return text if len(text) <= 200 else text[:200] + "..."

    return f"{cut((prefix or '') + row['source'])}\n-> {cut(row['target'])}"


def build_trainer(model: Any, args: Any, tokenizer: Any, train: Any, eval_data: Any) -> Any:
    from transformers import Seq2SeqTrainer

    # the decoder inputs come from the collator: the loss is Lathe's (token_loss_trainer), so the
    # model runs without labels
    collator = Seq2SeqCollator(tokenizer.pad_token_id, model.prepare_decoder_input_ids_from_labels)
    return token_loss_trainer(Seq2SeqTrainer, model=model, args=args, train_dataset=train, eval_dataset=eval_data,
                              processing_class=tokenizer, data_collator=collator,
                              compute_metrics=partial(scores, tokenizer))


def texts(tokenizer: Any, ids: Any) -> list[str]:
    import numpy as np

    ids = np.asarray(ids)
    ids = np.where(ids == IGNORE_INDEX, tokenizer.pad_token_id, ids)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def scores(tokenizer: Any, prediction: Any) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L (percent) of the generated targets against the references."""
    return generation_scores(texts(tokenizer, prediction.predictions), texts(tokenizer, prediction.label_ids))


def predict(trainer: Any, rows: Any, tokenizer: Any, output_dir: str) -> dict[str, float]:
    """predictions.jsonl (source, generated text, reference, origin per row, in order) and
    predict_results.json (BLEU-4, ROUGE)."""
    out = trainer.predict(rows, metric_key_prefix="predict")
    metrics = {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))}
    if not is_main_process():
        return metrics
    generated = texts(tokenizer, out.predictions)
    path = Path(output_dir) / PREDICTIONS_FILE
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(generated):
            row = rows[i]
            f.write(json.dumps({"source": row["source"], "predict": text, "label": row["target"],
                                "origin": row["origin"]}, ensure_ascii=False) + "\n")
    trainer.save_metrics("predict", metrics)
    log(f"Saved {len(generated)} predictions to {path}")
    return metrics


# What `lathe quantize` calibrates on: rows as this stage tokenizes them (its processor), batched.
CALIBRATION = (processor, Seq2SeqCollator)
