"""Sentence embeddings: text pairs -> an encoder whose vectors put related texts close (search,
retrieval, clustering, deduplication).

Rows are an anchor and a positive (a query and its passage, a sentence and its paraphrase),
with either a hard negative or a similarity score. The model is the bare checkpoint
(AutoModel); a text's vector is its tokens' vectors pooled (mean over real tokens for
encoders, the last real token for decoders, or the first: `pooling`). Without scores the
loss is contrastive with in-batch negatives: each anchor must pick its own positive among
every positive and hard negative of the batch (cosine similarities / embed_temperature,
cross-entropy; in several processes, of every process's batch); with scores it is the squared
error between the pair's cosine similarity and its score.

Evaluation embeds every eval pair and ranks all eval positives for each anchor: recall@1,
@5, @10 and MRR (and the Spearman correlation of similarity and score for scored pairs).
The run directory also holds sentence-transformers' files (modules.json, the pooling), so a
full run or an export loads with `SentenceTransformer(folder)` as well as AutoModel.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from lathe.config.load import replace
from lathe.config.schema import LatheConfig
from lathe.data.collators import EmbedCollator
from lathe.data.loader import TaskProcessor
from lathe.data.tasks import check_pairs, make_embed_preprocess
from lathe.distributed import world_size
from lathe.errors import ConfigError
from lathe.recipes.common import (
    RunResult,
    is_main_process,
    log,
    open_stage,
    print_summary,
    start_run,
)
from lathe.recipes.heads import build_task_model, finish, fit, label_rows, refuse_packing

PREDICTIONS_FILE = "predictions.jsonl"
RECALL_AT = (1, 5, 10)


def run(cfg: LatheConfig) -> RunResult:
    refuse_packing(cfg)
    pooling = resolve_pooling(cfg)
    # the pairs are not one input_ids column: the Trainer cannot count tokens seen
    # several processes: the encoder's pooler (BERT's) is not part of the loss; DDP must look for
    # such parameters each step
    o = open_stage(cfg, check_template=False, task=partial(processor, cfg),
                   args_kwargs={"include_num_input_tokens_seen": False,
                                **({"ddp_find_unused_parameters": True} if world_size() > 1 else {})})
    cfg = replace(cfg, pooling=pooling)  # config.yaml records the pooling auto chose (predict, export)
    tokenizer, data, notes = o.tokenizer, o.data, o.notes
    loss_kind = o.task

    model = build_task_model(cfg, o.model_path, tokenizer, "embed", {})
    start_run(cfg, o)
    loss = "cosine loss against the scores" if loss_kind == "score" else "contrastive loss, in-batch negatives"
    notes.append(f"{pooling} pooling; {loss}")
    print_summary(cfg, model, o.model_path, data, show_row(next(iter(data.train))), notes,
                  example_caption="anchor ~ positive")

    from lathe.recipes.trainers import EmbeddingTrainer

    trainer = EmbeddingTrainer(model=model, args=o.args, train_dataset=data.train, eval_dataset=data.eval,
                               processing_class=tokenizer, data_collator=EmbedCollator(tokenizer.pad_token_id),
                               compute_metrics=retrieval_scores)
    trainer.pooling, trainer.temperature = pooling, cfg.task.embed_temperature
    train_metrics, eval_metrics = fit(
        trainer, cfg, o.resume_from, data.eval is not None,
        after_save=lambda: write_sentence_transformers_files(Path(cfg.train.output_dir), pooling,
                                                             cfg.data.cutoff_len, model.config))
    predict_metrics = predict(trainer, data.eval, cfg.train.output_dir) \
        if cfg.train.do_predict and data.eval is not None else {}
    return finish(trainer, cfg, tokenizer, train_metrics, eval_metrics, predict_metrics, data.test)


def processor(cfg: LatheConfig, rows: list[dict] | None, tokenizer: Any) -> tuple[TaskProcessor, str]:
    rows, eval_rows = label_rows(cfg, rows, "embed")
    kind = check_pairs(rows)
    if eval_rows and check_pairs(eval_rows) != kind:
        have = "have" if kind != "score" else "lack"
        raise ConfigError(f"the training pairs train a {kind} loss but the eval pairs {have} scores; give both "
                          "sets the same kind of pairs")
    return TaskProcessor(make_embed_preprocess(tokenizer, cfg.data.cutoff_len), kind), kind


def resolve_pooling(cfg: LatheConfig) -> str:
    """pooling: auto -> mean for encoders (models with a masked-LM head: BERT, RoBERTa, ...),
    last for decoder-only models; an encoder-decoder is refused."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from lathe.model.load import resolve_model_path

    path = resolve_model_path(cfg.model.model_name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"stage embed pools the vectors of an encoder (BERT ...) or a decoder (Llama ...); "
                          f"{config.model_type} is an encoder-decoder, which Lathe does not embed with yet")
    if cfg.task.pooling != "auto":
        return cfg.task.pooling
    return "mean" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def show_row(row: dict[str, Any]) -> str:
    return f"{row['anchor'][:200]}\n~ {row['positive'][:200]}"


# --- pooling, losses and metrics: small pure functions --------------------------------------------

def pool(hidden: Any, mask: Any, how: str) -> Any:
    """[batch, tokens, dim] -> [batch, dim] over the real tokens (mask 1)."""
    import torch

    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def contrastive_loss(anchors: Any, candidates: Any, temperature: float, first: int = 0) -> Any:
    """Each anchor i against every candidate (row first + i of them is its positive; the rest,
    and any hard negatives after them, are negatives): cross-entropy over cosine / temperature."""
    import torch
    import torch.nn.functional as F

    sims = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T / temperature
    return F.cross_entropy(sims.float(), first + torch.arange(anchors.shape[0], device=anchors.device))


def across_processes(vectors: Any) -> tuple[Any, int]:
    """(every process's `vectors` in rank order, where this process's rows start) while training
    in several processes, so that in-batch negatives are the whole global batch's, as in one
    process at the same global batch; the gather carries gradients back to the process that made
    each vector. (vectors, 0) in one process, and outside training (no gradient)."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and torch.is_grad_enabled()):
        return vectors, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(vectors.contiguous())), dist.get_rank() * vectors.shape[0]


def cosine_loss(anchors: Any, positives: Any, scores: Any) -> Any:
    import torch.nn.functional as F

    return F.mse_loss(F.cosine_similarity(anchors, positives, dim=-1).float(), scores.float())


def retrieval_scores(prediction: Any) -> dict[str, float]:
    """recall@k and MRR: every anchor ranks every eval positive by cosine similarity; its own
    positive should come first. Scored pairs: also the Spearman correlation of similarity and
    score."""
    import numpy as np

    vectors = np.asarray(prediction.predictions, dtype=np.float64)  # [pairs, 2 (+1 score), dim]
    anchors, positives = vectors[:, 0], vectors[:, 1]
    anchors = anchors / np.clip(np.linalg.norm(anchors, axis=1, keepdims=True), 1e-12, None)
    positives = positives / np.clip(np.linalg.norm(positives, axis=1, keepdims=True), 1e-12, None)
    sims = anchors @ positives.T
    own = np.diag(sims)
    rank = (sims > own[:, None]).sum(axis=1) + 1  # 1 = its own positive is the most similar
    out = {f"recall@{k}": float((rank <= k).mean()) for k in RECALL_AT}
    out["mrr"] = float((1.0 / rank).mean())
    labels = prediction.label_ids
    if labels is not None and not np.isnan(np.asarray(labels, dtype=np.float64)).any():
        out["spearman"] = _spearman(own, np.asarray(labels, dtype=np.float64))
    return out


def _spearman(a: Any, b: Any) -> float:
    import numpy as np

    def ranks(x: Any) -> Any:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


# --- what a run directory holds beside the weights --------------------------------------------------

def write_sentence_transformers_files(folder: Path, pooling: str, cutoff_len: int, config: Any) -> None:
    """modules.json, sentence_bert_config.json and 1_Pooling/config.json: sentence-transformers
    then loads the folder as the same encoder + pooling (a full model; an adapter run gets them
    through lathe export). Texts are cut at cutoff_len tokens, as in training."""
    max_seq_length = min(cutoff_len, getattr(config, "max_position_embeddings", None) or cutoff_len)
    dim = getattr(config, "hidden_size", None)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n", encoding="utf-8")
    mode = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}
    config = {"word_embedding_dimension": dim, **{m: m == mode[pooling] for m in mode.values()}}
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def predict(trainer: Any, rows: Any, output_dir: str, top: int = 5) -> dict[str, float]:
    """predictions.jsonl: for every eval anchor, the rank of its own positive among all eval
    positives and the `top` most similar ones; predict_results.json: recall@k, MRR."""
    import numpy as np

    out = trainer.predict(rows, metric_key_prefix="predict")
    metrics = {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))}
    if not is_main_process():
        return metrics
    vectors = np.asarray(out.predictions, dtype=np.float64)
    a = vectors[:, 0] / np.clip(np.linalg.norm(vectors[:, 0], axis=1, keepdims=True), 1e-12, None)
    p = vectors[:, 1] / np.clip(np.linalg.norm(vectors[:, 1], axis=1, keepdims=True), 1e-12, None)
    sims = a @ p.T
    path = Path(output_dir) / PREDICTIONS_FILE
    with open(path, "w", encoding="utf-8") as f:
        for i in range(len(sims)):
            order = np.argsort(-sims[i])
            f.write(json.dumps({"anchor": rows[i]["anchor"], "positive": rows[i]["positive"],
                                "rank": int((sims[i] > sims[i, i]).sum()) + 1,
                                "top": [{"text": rows[int(j)]["positive"], "similarity": round(float(sims[i, j]), 6)}
                                        for j in order[:top]],
                                "origin": rows[i]["origin"]}, ensure_ascii=False) + "\n")
    trainer.save_metrics("predict", metrics)
    log(f"Saved {len(sims)} rankings to {path}")
    return metrics
