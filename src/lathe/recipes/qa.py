"""Extractive question answering: a context, a question and the answer's character span ->
a model that points at the answer in the context.

Rows are in SQuAD's layout (context, question, answers with their character starts; an
empty list where the context holds no answer, as in SQuAD 2.0). A context longer than
cutoff_len is read in overlapping windows (doc_stride); each window is a training feature
whose target is the answer's first and last token, or the first token ("no answer") where
the answer is not inside it. The model is the checkpoint under a span head
(AutoModelForQuestionAnswering: start and end logits per token).

Evaluation puts every example's windows back together: the best span (start + end logit,
at most max_answer_length tokens, inside the context) over all windows, or no answer when
the data has unanswerable questions and "no answer" scores higher; then SQuAD's exact match
and F1 against every gold answer. do_predict (or `lathe predict`) writes each question's
answer and its character start.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.collators import QACollator
from lathe.data.loader import TaskProcessor
from lathe.data.tasks import make_qa_preprocess
from lathe.errors import ConfigError
from lathe.eval.metrics import squad_scores
from lathe.recipes.common import (
    RunResult,
    is_main_process,
    log,
    open_stage,
    print_summary,
    start_run,
)
from lathe.recipes.heads import build_task_model, finish, fit, refuse_packing, refuse_streaming

PREDICTIONS_FILE = "predictions.jsonl"
N_BEST = 20  # the best start and end positions of a window that are paired up


def run(cfg: LatheConfig) -> RunResult:
    refuse_packing(cfg)
    if stride(cfg) >= cfg.data.cutoff_len // 2:
        raise ConfigError(f"doc_stride={stride(cfg)} must be less than half of cutoff_len={cfg.data.cutoff_len} "
                          "(windows of the context overlap by doc_stride tokens, the question in each)")
    o = open_stage(cfg, check_template=False, task=partial(processor, cfg),
                   args_kwargs={"label_names": ["start_positions", "end_positions"]})
    tokenizer, data, notes = o.tokenizer, o.data, o.notes

    model = build_task_model(cfg, o.model_path, tokenizer, "qa", {})
    start_run(cfg, o)
    print_summary(cfg, model, o.model_path, data, show_row(next(iter(data.train))), notes,
                  example_caption="question | context -> answer; one window of the context per row")

    trainer = build_trainer(model, o.args, tokenizer, data.train, data.eval, cfg.task.max_answer_length)
    train_metrics, eval_metrics = fit(trainer, cfg, o.resume_from, data.eval is not None)
    predict_metrics = predict(trainer, data.eval, cfg.task.max_answer_length, cfg.train.output_dir) \
        if cfg.train.do_predict and data.eval is not None else {}
    if data.test is not None:  # the span scores read the rows they score
        trainer.compute_metrics = partial(scores, data.test, cfg.task.max_answer_length)
    return finish(trainer, cfg, tokenizer, train_metrics, eval_metrics, predict_metrics, data.test)


def stride(cfg: LatheConfig) -> int:
    return cfg.task.doc_stride if cfg.task.doc_stride is not None else min(128, cfg.data.cutoff_len // 4)


def processor(cfg: LatheConfig, rows: list[dict] | None, tokenizer: Any) -> tuple[TaskProcessor, None]:
    refuse_streaming(cfg, rows, "tokenizes every row before training")
    return TaskProcessor(make_qa_preprocess(tokenizer, cfg.data.cutoff_len, stride(cfg)),
                         json.dumps([stride(cfg)])), None


def show_row(row: dict[str, Any]) -> str:
    answers = json.loads(row["answers"])
    context = row["context"] if len(row["context"]) <= 160 else row["context"][:160] + "..."
    return f"{row['question']} | {context}\n-> {answers[0][0] if answers else '(no answer)'}"


# --- spans back from logits ---------------------------------------------------------------------

def best_answers(start_logits: Any, end_logits: Any, features: Any, max_answer_length: int,
                 allow_none: bool) -> dict[str, tuple[str, int]]:
    """Per example (its origin): (answer text, its character start; -1 for no answer), the best
    span over all the example's windows."""
    import numpy as np

    best: dict[str, tuple[float, str, int]] = {}
    none_score: dict[str, float] = {}
    for i in range(len(features)):
        offsets, origin, context = features[i]["offsets"], features[i]["origin"], features[i]["context"]
        s, e = np.asarray(start_logits[i])[:len(offsets)], np.asarray(end_logits[i])[:len(offsets)]
        none_score[origin] = min(none_score.get(origin, np.inf), float(s[0] + e[0]))
        best.setdefault(origin, (-np.inf, "", -1))
        starts = [k for k in np.argsort(s)[::-1][:N_BEST] if offsets[k][0] >= 0]
        ends = [k for k in np.argsort(e)[::-1][:N_BEST] if offsets[k][0] >= 0]
        for a in starts:
            for b in ends:
                if b < a or b - a + 1 > max_answer_length:
                    continue
                score = float(s[a] + e[b])
                if score > best[origin][0]:
                    first, last = offsets[a][0], offsets[b][1]
                    best[origin] = (score, context[first:last], first)
    out = {}
    for origin, (score, text, first) in best.items():
        out[origin] = ("", -1) if allow_none and none_score[origin] > score else (text, first)
    return out


def _golds(features: Any) -> dict[str, list[str]]:
    return {features[i]["origin"]: [t for t, _ in json.loads(features[i]["answers"])] for i in range(len(features))}


def scores(features: Any, max_answer_length: int, prediction: Any) -> dict[str, float]:
    """SQuAD exact match and F1 (percent) of the best spans."""
    start, end = prediction.predictions
    golds = _golds(features)
    answers = best_answers(start, end, features, max_answer_length, any(not g for g in golds.values()))
    return squad_scores([answers[k][0] for k in golds], list(golds.values()))


def build_trainer(model: Any, args: Any, tokenizer: Any, train: Any, eval_data: Any, max_answer_length: int) -> Any:
    metrics = partial(scores, eval_data, max_answer_length) if eval_data is not None else None
    from lathe.recipes.trainers import SpanTrainer

    return SpanTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval_data,
                       processing_class=tokenizer, data_collator=QACollator(tokenizer.pad_token_id),
                       compute_metrics=metrics)


def predict(trainer: Any, rows: Any, max_answer_length: int, output_dir: str) -> dict[str, float]:
    """predictions.jsonl (per question: the answer, its character start (-1: none), the gold
    answers) and predict_results.json (exact match, F1)."""
    trainer.compute_metrics = partial(scores, rows, max_answer_length)
    out = trainer.predict(rows, metric_key_prefix="predict")
    metrics = {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))}
    if not is_main_process():
        return metrics
    golds = _golds(rows)
    start, end = out.predictions
    answers = best_answers(start, end, rows, max_answer_length, any(not g for g in golds.values()))
    first_feature = {}
    for i in range(len(rows)):
        first_feature.setdefault(rows[i]["origin"], i)
    path = Path(output_dir) / PREDICTIONS_FILE
    with open(path, "w", encoding="utf-8") as f:
        for origin, i in first_feature.items():
            text, at = answers[origin]
            f.write(json.dumps({"question": rows[i]["question"], "predict": text, "start": at,
                                "label": golds[origin], "origin": origin}, ensure_ascii=False) + "\n")
    trainer.save_metrics("predict", metrics)
    log(f"Saved {len(first_feature)} predictions to {path}")
    return metrics


# What `lathe quantize` calibrates on: rows as this stage tokenizes them (its processor), batched.
CALIBRATION = (processor, QACollator)
