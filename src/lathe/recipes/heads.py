"""What the task stages (cls, tagging, ...) share: the rows their label set is read from, and
the checkpoint under a new task head with what trains marked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError
from lathe.model.adapters import apply_finetuning
from lathe.model.load import PEFT_TASK_TYPE, load_model
from lathe.recipes.common import RunResult, finish_run, install_callbacks, is_main_process, ready_for_training, run_eval

# Names of new task heads across architectures (BERT: classifier; Llama, GPT-2: score;
# BART, T5: classification_head; QA models: qa_outputs).
HEAD_MODULES = ("classifier", "score", "classification_head", "qa_outputs")


def label_rows(cfg: LatheConfig, rows: list[dict] | None, kind: str) -> tuple[list[dict], list[dict]]:
    """(rows the label set is read from, eval rows checked against it). Predicting only (no
    dataset): the eval rows stand in, and the run's recorded label_names decide."""
    from lathe.data.loader import load_conversations

    refuse_streaming(cfg, rows, "reads its label set from every training row")
    evals = load_conversations(cfg.data, kind, names=cfg.data.eval_dataset)[0] if cfg.data.eval_dataset else []
    if not cfg.data.dataset:
        return evals, []
    return rows, evals


def refuse_streaming(cfg: LatheConfig, rows: list[dict] | None, why: str) -> None:
    """Task stages read their rows up front (`rows` is None when streaming)."""
    if rows is None:
        raise ConfigError(f"stage {cfg.finetune.stage} {why}; streaming: true cannot do that yet, so turn "
                          "streaming off")


def build_task_model(cfg: LatheConfig, model_path: str, tokenizer: Any, task: str, head: dict[str, Any]) -> Any:
    """The checkpoint under its new head (`task`: a row of lathe.model.load.TASKS), the method
    applied (an adapter trains the head in full beside it and saves it with it; freeze trains
    its blocks and the head)."""
    from lathe.model.methods import get_method, start_from_adapters

    model = load_model(cfg, model_path, tokenizer, task, head)
    method = get_method(cfg.finetune.finetuning_type)
    if not cfg.train.do_train:  # predicting: the given adapters, and nothing fresh on top of them
        model, _ = start_from_adapters(model, cfg.model)
        return model
    task_type = PEFT_TASK_TYPE[task]
    if task == "qa" and method.packs:
        # peft's question-answering wrapper drops token_type_ids (peft 0.21) when no virtual
        # tokens are prepended: the plain PeftModel forwards them, and the span head is saved
        # through modules_to_save (lathe.model.methods.task_heads)
        task_type = None
    model = apply_finetuning(model, cfg.finetune, cfg.model, task_type=task_type)
    if not method.adapter:
        for name, module in model.named_children():
            if name in HEAD_MODULES:
                module.requires_grad_(True)
    return ready_for_training(model, cfg)


def refuse_packing(cfg: LatheConfig) -> None:
    if cfg.data.packing:
        raise ConfigError(f"packing applies to language-model stages; stage {cfg.finetune.stage} reads one "
                          "example per row, so remove packing")


def fit(trainer: Any, cfg: LatheConfig, resume_from: str | None, has_eval: bool,
        after_save: Callable[[], None] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What every task stage does with its trainer: our progress bar and log, training (when
    do_train) and saving (`after_save`: rank 0 writes what goes beside the weights), then the
    evaluation. Returns (train metrics, eval metrics or None)."""
    install_callbacks(trainer, cfg, perplexity=False)
    train_metrics: dict[str, Any] = {}
    if cfg.train.do_train:
        train_metrics = dict(trainer.train(resume_from_checkpoint=resume_from).metrics)
        trainer.save_model()
        if after_save is not None and is_main_process():
            after_save()
    eval_metrics = None
    if has_eval and (cfg.train.do_train or cfg.train.do_eval):
        eval_metrics = run_eval(trainer, perplexity=False)
    return train_metrics, eval_metrics


def finish(trainer: Any, cfg: LatheConfig, tokenizer: Any, train_metrics: dict[str, Any],
           eval_metrics: dict[str, Any] | None, predict_metrics: dict[str, Any], test: Any = None) -> RunResult:
    result = finish_run(trainer, cfg, tokenizer, train_metrics, eval_metrics, test, perplexity=False)
    result.metrics.update(predict_metrics)
    return result
