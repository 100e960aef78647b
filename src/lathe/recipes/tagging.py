"""Token classification (named entities, part-of-speech ...): words with a tag each -> a tagger.

Rows are lists of words with one tag per word (tokens / tags columns, or CoNLL files). The
tag set comes from the training rows (O first, then by entity type, B- before I-) or
label_names, and is recorded in config.yaml. Each word is split by the model's tokenizer;
its tag goes on its first piece, the later pieces are ignored (label_all_tokens: they learn
the inside tag too). The model is the checkpoint under a new token-classification head
(AutoModelForTokenClassification), with its own cross-entropy loss.

Scores are per word and per entity, as CoNLL's conlleval counts them (IOB1, IOB2 / BIO and
IOBES all read): entity precision, recall and F1 (exact span and type), macro F1 over
types, word accuracy; at the end a per-type report (tagging_report.json). do_predict (or
`lathe predict`) writes each sentence's tags and entities.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from lathe.config.load import replace
from lathe.config.schema import LatheConfig
from lathe.data.collators import TaggerCollator
from lathe.data.loader import TaskProcessor
from lathe.data.tasks import LabelSet, make_tagging_preprocess, resolve_tags
from lathe.eval import metrics as M
from lathe.model.load import classifier_head
from lathe.recipes.common import (
    RunResult,
    is_main_process,
    log,
    open_stage,
    print_summary,
    start_run,
    token_loss_trainer,
)
from lathe.recipes.heads import build_task_model, finish, fit, label_rows, refuse_packing

PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "tagging_report.json"


def run(cfg: LatheConfig) -> RunResult:
    refuse_packing(cfg)
    o = open_stage(cfg, check_template=False, task=partial(tag_set, cfg))
    tags: LabelSet = o.task
    cfg = replace(cfg, **tags.config_keys())  # config.yaml records the tags, in id order
    tokenizer, data, notes = o.tokenizer, o.data, o.notes

    model = build_task_model(cfg, o.model_path, tokenizer, "token_cls",
                             classifier_head("token_classification", tags.names))
    start_run(cfg, o)
    shown = ", ".join(tags.names[:8]) + (", ..." if len(tags.names) > 8 else "")
    print_summary(cfg, model, o.model_path, data, show_row(next(iter(data.train)), tags), notes,
                  example_caption=f"word/TAG; {len(tags.names)} tags: {shown}")

    trainer = build_trainer(model, o.args, tokenizer, data.train, data.eval, tags)
    train_metrics, eval_metrics = fit(trainer, cfg, o.resume_from, data.eval is not None)
    predict_metrics: dict[str, Any] = {}
    if data.eval is not None and (cfg.train.do_predict or eval_metrics is not None):
        predict_metrics = predict(trainer, data.eval, tags, cfg.train.output_dir, write=cfg.train.do_predict)
    return finish(trainer, cfg, tokenizer, train_metrics, eval_metrics, predict_metrics, data.test)


def tag_set(cfg: LatheConfig, rows: list[dict] | None, tokenizer: Any) -> tuple[TaskProcessor, LabelSet]:
    rows, eval_rows = label_rows(cfg, rows, "tagging")
    tags = resolve_tags(rows, eval_rows, cfg.task.label_names, cfg.task.num_labels)
    key = json.dumps([list(tags.names), cfg.task.label_all_tokens])
    return TaskProcessor(make_tagging_preprocess(tokenizer, cfg.data.cutoff_len, tags, cfg.task.label_all_tokens),
                         key), tags


def first_pieces(word_ids: list[int]) -> list[int]:
    """Positions of each word's first piece (the word's tag is read there)."""
    return [j for j, w in enumerate(word_ids) if w >= 0 and (j == 0 or word_ids[j - 1] != w)]


def show_row(row: dict[str, Any], tags: LabelSet) -> str:
    words = row["tokens"]
    labels = [row["labels"][j] for j in first_pieces(row["word_ids"])]
    return " ".join(f"{w}/{tags.names[t]}" if tags.names[t] != "O" else w for w, t in zip(words, labels))


# --- the trainer and its scores ------------------------------------------------------------------

def build_trainer(model: Any, args: Any, tokenizer: Any, train: Any, eval_data: Any, tags: LabelSet) -> Any:
    starts = [first_pieces(w) for w in eval_data["word_ids"]] if eval_data is not None else []
    return token_loss_trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_data,
                              processing_class=tokenizer, data_collator=TaggerCollator(tokenizer.pad_token_id),
                              compute_metrics=partial(scores, tags, starts))


def word_tags(logits: Any, label_ids: Any, starts: list[list[int]], tags: LabelSet) -> tuple[list, list]:
    """(predicted, gold) tag names per sentence, one per word the model saw (its first piece)."""
    import numpy as np

    best = np.asarray(logits).argmax(-1)
    gold = np.asarray(label_ids)
    predicted, wanted = [], []
    for i, positions in enumerate(starts):
        predicted.append([tags.names[int(best[i, j])] for j in positions])
        wanted.append([tags.names[int(gold[i, j])] for j in positions])
    return predicted, wanted


def scores(tags: LabelSet, starts: list[list[int]], prediction: Any) -> dict[str, float]:
    predicted, wanted = word_tags(prediction.predictions, prediction.label_ids, starts, tags)
    result = M.entity_scores(predicted, wanted)
    return {k: v for k, v in result.items() if k != "per_type"}


# --- predictions and the report -------------------------------------------------------------------

def predict(trainer: Any, rows: Any, tags: LabelSet, output_dir: str, write: bool = True) -> dict[str, float]:
    """tagging_report.json (entity scores per type); with `write`, predictions.jsonl (per
    sentence: its words, the predicted tags and entities, the gold tags) and
    predict_results.json."""
    starts = [first_pieces(w) for w in rows["word_ids"]]
    out = trainer.predict(rows, metric_key_prefix="predict")
    predicted, wanted = word_tags(out.predictions, out.label_ids, starts, tags)
    metrics = {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))}
    if not is_main_process():
        return metrics if write else {}
    report = M.entity_scores(predicted, wanted)
    path = Path(output_dir) / REPORT_FILE
    path.write_text(json.dumps({"tags": list(tags.names), **report}, indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    log(f"Saved {path}")
    if not write:
        return {}
    path = Path(output_dir) / PREDICTIONS_FILE
    with open(path, "w", encoding="utf-8") as f:
        for i, (p, y) in enumerate(zip(predicted, wanted)):
            words = rows[i]["tokens"]
            record = {"tokens": words, "predict": p,
                      "entities": [{"type": k, "start": a, "end": b + 1, "text": " ".join(words[a:b + 1])}
                                   for k, a, b in M.entities(p)],
                      "label": y, "origin": rows[i]["origin"]}
            if len(p) < len(words):
                record["truncated"] = f"only the first {len(p)} of {len(words)} words fit in cutoff_len"
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    trainer.save_metrics("predict", metrics)
    log(f"Saved {len(predicted)} predictions to {path}")
    return metrics


# What `lathe quantize` calibrates on: rows as this stage tokenizes them (its processor), batched.
CALIBRATION = (tag_set, TaggerCollator)
