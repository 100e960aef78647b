"""Sequence classification and regression: text (+ text_pair) and a label -> a classifier.

The label set is decided from the training rows before anything is tokenized
(lathe.data.tasks: names, ids, lists for multi-label, numbers for regression) and written
into the run's config.yaml as label_names / problem_type, so predict, export and a repeat
rebuild the same head. The model is the checkpoint under a new classification head
(AutoModelForSequenceClassification: BERT-style encoders read [CLS], decoders such as
Llama or GPT-2 their last real token); its own loss (cross-entropy, BCE for multi-label,
MSE for regression). An adapter method trains the head in full beside the adapter and
saves it with it; freeze trains the last blocks and the head.

Evaluation reports accuracy, precision / recall / F1 (macro and micro) for classes, MSE,
RMSE, MAE and R^2 for regression; at the end the eval set's per-class report and confusion
matrix (JSON and PNG). do_predict (or `lathe predict`) writes one JSONL row per input.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from lathe.config.load import replace
from lathe.config.schema import LatheConfig
from lathe.data.collators import ClassifierCollator
from lathe.data.loader import TaskProcessor
from lathe.data.tasks import MULTI, REGRESSION, LabelSet, make_cls_preprocess, resolve_labels
from lathe.eval import metrics as M
from lathe.model.load import classifier_head
from lathe.recipes.common import (
    RunResult,
    is_main_process,
    log,
    mean_loss_trainer,
    open_stage,
    print_summary,
    start_run,
)
from lathe.recipes.heads import build_task_model, finish, fit, label_rows, refuse_packing

PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "classification_report.json"
CONFUSION_PNG = "confusion_matrix.png"


def run(cfg: LatheConfig) -> RunResult:
    refuse_packing(cfg)
    o = open_stage(cfg, check_template=False, task=partial(label_set, cfg))
    labels: LabelSet = o.task
    cfg = replace(cfg, **labels.config_keys())  # config.yaml records the classes, in id order
    tokenizer, data, notes = o.tokenizer, o.data, o.notes

    model = build_model(cfg, o.model_path, tokenizer, labels)
    start_run(cfg, o)
    print_summary(cfg, model, o.model_path, data, show_row(next(iter(data.train)), labels), notes,
                  example_caption=describe(labels))

    trainer = build_trainer(model, o.args, tokenizer, data.train, data.eval, labels)
    train_metrics, eval_metrics = fit(trainer, cfg, o.resume_from, data.eval is not None)
    predict_metrics: dict[str, Any] = {}
    if cfg.train.do_predict and data.eval is not None:
        predict_metrics = predict(trainer, data.eval, labels, cfg.train.output_dir)
    elif eval_metrics is not None and labels.problem_type != REGRESSION and is_main_process():
        report(trainer, data.eval, labels, cfg.train.output_dir)  # per class, confusion matrix
    return finish(trainer, cfg, tokenizer, train_metrics, eval_metrics, predict_metrics, data.test)


# --- the label set and the data -------------------------------------------------------------

def label_set(cfg: LatheConfig, rows: list[dict] | None, tokenizer: Any) -> tuple[TaskProcessor, LabelSet]:
    """The classes (or regression) from the training rows, checked against the eval rows."""
    rows, eval_rows = label_rows(cfg, rows, "cls")
    t = cfg.task
    labels = resolve_labels(rows, eval_rows, t.problem_type, t.label_names, t.num_labels)
    key = json.dumps([labels.problem_type, list(labels.names)])
    return TaskProcessor(make_cls_preprocess(tokenizer, cfg.data.cutoff_len, labels), key), labels


def describe(labels: LabelSet) -> str:
    if labels.problem_type == REGRESSION:
        return "text -> number (regression)"
    shown = ", ".join(labels.names[:6]) + (", ..." if len(labels.names) > 6 else "")
    kind = "classes, several per row" if labels.problem_type == MULTI else "classes"
    return f"text -> label; {len(labels.names)} {kind}: {shown}"


def show_row(row: dict[str, Any], labels: LabelSet) -> str:
    text = row["text"] if len(row["text"]) <= 200 else row["text"][:200] + "..."
    pair = f"\n[text_pair] {row['text_pair'][:200]}" if row.get("text_pair") else ""
    return f"{text}{pair}\n-> {gold(row['labels'], labels)}"


def gold(encoded: Any, labels: LabelSet) -> Any:
    """An encoded label back to what the user wrote (a name, names, a number)."""
    if labels.problem_type == REGRESSION:
        return encoded
    if labels.problem_type == MULTI:
        return [n for n, hot in zip(labels.names, encoded) if hot]
    return labels.names[encoded]


# --- the model and the trainer --------------------------------------------------------------

def build_model(cfg: LatheConfig, model_path: str, tokenizer: Any, labels: LabelSet) -> Any:
    return build_task_model(cfg, model_path, tokenizer, "seq_cls", classifier_head(labels.problem_type, labels.names))


def build_trainer(model: Any, args: Any, tokenizer: Any, train: Any, eval_data: Any, labels: LabelSet) -> Any:
    return mean_loss_trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_data,
                             processing_class=tokenizer, data_collator=ClassifierCollator(tokenizer.pad_token_id),
                             compute_metrics=partial(scores, labels))


def _decide(logits: Any, labels: LabelSet) -> Any:
    """Logits -> predictions: a class id, a multi-hot row (sigmoid > 0.5), or a number."""
    import numpy as np

    logits = np.asarray(logits)
    if labels.problem_type == REGRESSION:
        return logits.reshape(-1)
    if labels.problem_type == MULTI:
        return (logits > 0).astype(int)
    return logits.argmax(-1)


def scores(labels: LabelSet, prediction: Any) -> dict[str, float]:
    """compute_metrics: the metrics of the task (keys as metric_for_best_model names them)."""
    import numpy as np

    predicted = _decide(prediction.predictions, labels)
    gold_ = np.asarray(prediction.label_ids)
    if labels.problem_type == REGRESSION:
        return M.regression_scores(predicted.tolist(), gold_.reshape(-1).tolist())
    if labels.problem_type == MULTI:
        return M.multilabel_scores(predicted.tolist(), gold_.astype(int).tolist())
    return M.classification_scores(predicted.tolist(), gold_.tolist())


# --- the report and the predictions ------------------------------------------------------------

def _outputs(trainer: Any, rows: Any, labels: LabelSet) -> tuple[Any, Any]:
    """(logits, decided predictions) for `rows`, through the Trainer's loop (every process)."""
    out = trainer.predict(rows, metric_key_prefix="predict")
    return out, _decide(out.predictions, labels)


def report(trainer: Any, rows: Any, labels: LabelSet, output_dir: str, out: Any = None) -> dict[str, Any]:
    """classification_report.json (per class precision / recall / F1 / support) and, for
    single-label, the confusion matrix (in the JSON, and as confusion_matrix.png)."""
    import numpy as np

    from lathe.recipes.plots import plot_confusion

    if out is None:
        out, predicted = _outputs(trainer, rows, labels)
    else:
        predicted = _decide(out.predictions, labels)
    gold_ = np.asarray(out.label_ids)
    names = list(labels.names)
    if labels.problem_type == MULTI:
        per_class = {n: M.per_class_scores(predicted[:, j].tolist(), gold_[:, j].astype(int).tolist(),
                                           ["no", n])[n] for j, n in enumerate(names)}
        content: dict[str, Any] = {"problem_type": MULTI, "per_class": per_class,
                                   **M.multilabel_scores(predicted.tolist(), gold_.astype(int).tolist())}
    else:
        matrix = M.confusion_matrix(predicted.tolist(), gold_.tolist(), len(names))
        content = {"problem_type": labels.problem_type, "labels": names,
                   **M.classification_scores(predicted.tolist(), gold_.tolist()),
                   "per_class": M.per_class_scores(predicted.tolist(), gold_.tolist(), names),
                   "confusion_matrix": {"rows": "true label", "columns": "predicted label", "counts": matrix}}
        png = plot_confusion(matrix, names, Path(output_dir) / CONFUSION_PNG,
                             f"confusion matrix of {Path(output_dir).name} ({len(predicted)} eval rows)")
        log(f"Saved {png}")
    path = Path(output_dir) / REPORT_FILE
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"Saved {path}")
    return content


def predict(trainer: Any, rows: Any, labels: LabelSet, output_dir: str) -> dict[str, float]:
    """predictions.jsonl (one row per input, in order: text, the predicted label with every
    class's probability, and the gold label) and predict_results.json (the metrics)."""
    import numpy as np

    out, predicted = _outputs(trainer, rows, labels)
    metrics = {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))}
    if not is_main_process():
        return metrics
    logits = np.asarray(out.predictions, dtype=np.float64)
    path = Path(output_dir) / PREDICTIONS_FILE
    with open(path, "w", encoding="utf-8") as f:
        for i in range(len(predicted)):
            row = rows[i]
            record: dict[str, Any] = {"text": row["text"]}
            if row.get("text_pair"):
                record["text_pair"] = row["text_pair"]
            record.update(_prediction(logits[i], predicted[i], labels))
            record["label"] = gold(row["labels"], labels)
            record["origin"] = row["origin"]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    trainer.save_metrics("predict", metrics)
    log(f"Saved {len(predicted)} predictions to {path}")
    if labels.problem_type != REGRESSION:
        report(trainer, rows, labels, output_dir, out)
    return metrics


def _prediction(logits: Any, decided: Any, labels: LabelSet) -> dict[str, Any]:
    import numpy as np

    if labels.problem_type == REGRESSION:
        return {"predict": float(decided)}
    if labels.problem_type == MULTI:
        probs = 1.0 / (1.0 + np.exp(-logits))
        return {"predict": [n for n, hot in zip(labels.names, decided) if hot],
                "probabilities": {n: round(float(p), 6) for n, p in zip(labels.names, probs)}}
    shifted = np.exp(logits - logits.max())
    probs = shifted / shifted.sum()
    return {"predict": labels.names[int(decided)],
            "probabilities": {n: round(float(p), 6) for n, p in zip(labels.names, probs)}}


# What `lathe quantize` calibrates on: rows as this stage tokenizes them (its processor), batched.
CALIBRATION = (label_set, ClassifierCollator)
