"""The Trainer subclasses of the stages that need one, at module level. This module imports
transformers and torch at once, so recipes import it inside `run`/`build`, after their cheap
checks (a wrong key or row is reported in a second, before the slow imports).

- PolicyReferenceTrainer: what dpo and kto share (log-probs of the labelled tokens, the
  reference policy without a model copy where the method allows it, metrics averaged per
  logging step, checkpoints that hold only the trained adapter);
- DPOTrainer: the dpo family's pair loss and its split backward (activations of one side);
- KTOTrainer: the KTO loss with its mismatched KL rows;
- PairwiseTrainer: rm's pairwise loss, normalised over the pairs of the accumulated batch.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer

from lathe.distributed import prepare_frozen
from lathe.model.reference import REF_ADAPTER, as_reference
from lathe.recipes.embed import across_processes, contrastive_loss, cosine_loss, pool
from lathe.recipes.fused_loss import IGNORE_INDEX, linear_logprobs, output_layer
from lathe.recipes.losses import average_logps, kto_loss, preference_loss, sequence_logps
from lathe.recipes.rm import batch_pairs, pair_rewards, pairwise_loss


class PolicyReferenceTrainer(Trainer):
    """A Trainer whose subclass computes a preference loss in `compute_loss`.

    The loss is a mean over pairs/examples, not over tokens, so it must be divided
    by the accumulation steps like a plain mean: `loss_is_scaled_for_ga = False`
    says so (otherwise a batch with "labels" and a model taking loss kwargs would
    be treated as already normalised by `num_items_in_batch`).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, ref_model: Any = None, use_reference: bool = True,
                 fused: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ref_model = prepare_frozen(self, ref_model) if ref_model is not None else None
        self.use_reference = use_reference
        self.fused = fused  # log-probs from the final hidden states, the output layer a chunk at a time
        self._stats: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(lambda: [0.0, 0.0]), "eval": defaultdict(lambda: [0.0, 0.0])}

    # -- log-probs
    def logps(self, model: Any, batch: dict[str, Any], prefix: str = "") -> tuple[Any, Any]:
        """Summed log-probs of the labelled tokens and their count, per sequence: per row of a
        padded batch; per `seq_index` of a padding-free one (PaddingFreePairCollator)."""
        ids, labels = batch[f"{prefix}input_ids"], batch[f"{prefix}labels"]
        packed = not prefix and "seq_index" in batch
        where = {"position_ids": batch["position_ids"]} if packed else \
            {"attention_mask": batch[f"{prefix}attention_mask"]}
        head = output_layer(model) if self.fused else None
        if head is None and not packed:
            logits = model(input_ids=ids, **where, use_cache=False).logits
            # P-tuning and prompt tuning return logits for their virtual tokens too, in front
            return sequence_logps(logits[:, -ids.shape[1]:], labels)
        keep = labels[:, 1:].ne(IGNORE_INDEX)  # position t predicts token t+1
        targets = labels[:, 1:][keep]
        if head is not None:
            none = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)  # no logits at all
            out = model(input_ids=ids, **where, use_cache=False, logits_to_keep=none, output_hidden_states=True)
            token = linear_logprobs(out.hidden_states[-1][:, -ids.shape[1]:][:, :-1][keep], head.weight, targets)
        else:
            logits = model(input_ids=ids, **where, use_cache=False).logits[:, -ids.shape[1]:][:, :-1][keep].float()
            token = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        if packed:
            index = batch["seq_index"]
            first = int(index[index >= 0].min())
            n = int(index.max()) + 1 - first
            owner = index[:, 1:][keep] - first
        else:
            n = ids.shape[0]
            owner = keep.nonzero()[:, 0]
        total = torch.zeros(n, dtype=token.dtype, device=token.device).index_add(0, owner, token)
        count = torch.zeros(n, dtype=torch.long, device=token.device).index_add(0, owner, torch.ones_like(owner))
        return total, count

    def reference_logps(self, model: Any, batch: dict[str, Any], prefix: str = "") -> tuple[Any, Any]:
        with torch.no_grad(), self.reference(model) as ref:
            return self.logps(ref, batch, prefix)

    @contextlib.contextmanager
    def reference(self, model: Any) -> Iterator[Any]:
        """The reference policy, in eval mode (deterministic: no dropout)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        policy = self.accelerator.unwrap_model(model)
        was_training = policy.training
        policy.eval()
        try:
            with as_reference(policy) as ref:
                yield ref
        finally:
            policy.train(was_training)

    # -- metrics: summed per micro-batch, averaged when the Trainer logs
    def record(self, model: Any, key: str, total: float, count: float) -> None:
        stats = self._stats["train" if model.training else "eval"][key]
        stats[0] += float(total)
        stats[1] += float(count)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None:
            prefix = "eval_" if mode == "eval" else ""
            means = {k: s / c for k, (s, c) in self._stats[mode].items() if c}
            if {"rewards/chosen", "rewards/rejected"} <= means.keys() and "rewards/margins" not in means:
                means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
            logs.update({prefix + k: v for k, v in sorted(means.items())})
            self._stats[mode].clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints hold only the trained adapter: peft writes every adapter, and the
        frozen "ref" copy is rebuilt from adapter_name_or_path on resume anyway."""
        import shutil
        from pathlib import Path

        super()._save(output_dir, state_dict)
        ref_dir = Path(output_dir if output_dir is not None else self.args.output_dir) / REF_ADAPTER
        if self.args.should_save and ref_dir.is_dir() and (ref_dir / "adapter_config.json").is_file():
            shutil.rmtree(ref_dir)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, None, None]:
        """Evaluation = the same loss (and metrics) without gradients."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class DPOTrainer(PolicyReferenceTrainer):
    def __init__(self, *args: Any, align: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.align = align

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Mean over pairs (+ pref_ftx x mean NLL per chosen token), metrics recorded."""
        total, count = self.logps(model, inputs)
        n = total.shape[0] // 2
        refs = self._reference_halves(model, inputs, n)
        loss = self.pair_loss(model, (total[:n], count[:n]), (total[n:], count[n:]), *refs)
        return (loss, None) if return_outputs else loss

    def pair_loss(self, model: Any, chosen: tuple[Any, Any], rejected: tuple[Any, Any],
                  ref_chosen: Any, ref_rejected: Any) -> Any:
        """The loss from per-row (summed log-prob, token count); records the metrics."""
        a = self.align
        n = chosen[0].shape[0]
        out = preference_loss(a.pref_loss, chosen, rejected, ref_chosen, ref_rejected,
                              beta=a.pref_beta, label_smoothing=a.pref_label_smoothing,
                              simpo_gamma=a.simpo_gamma)
        losses = out.losses
        if a.pref_ftx > 0:
            sft = -average_logps(*chosen)
            losses = losses + a.pref_ftx * sft
            self.record(model, "sft_loss", sft.detach().sum().item(), n)
        self._record_pairs(model, out, chosen[0].detach(), rejected[0].detach(), n)
        return losses.mean()

    def _reference_halves(self, model: Any, inputs: dict[str, Any], n: int) -> tuple[Any, Any]:
        if not self.use_reference:
            return None, None
        total, count = self.reference_logps(model, inputs)
        return (total[:n], count[:n]), (total[n:], count[n:])

    # -- split backward: activations of one side at a time
    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        """With pref_split_backward, chosen and rejected rows go forward and backward
        one after the other instead of in one joint batch.

        The loss depends on the policy only through each row's summed log-prob, so
        its gradient is sum_i dL/dlogp_i * grad(logp_i): the coefficients dL/dlogp_i
        come from a first, gradient-free pass over the rejected rows, then each side
        is pushed back with its coefficients. Peak activation memory is that of one
        side (what SFT on the chosen replies costs), for one extra forward pass.
        Dropout masks of the rejected rows are replayed so both passes agree.
        """
        if not self._can_split():
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        n, chosen_rows, rejected_rows = _pair_halves(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        rng = _RngReplay(self.args.device)
        with self.compute_loss_context_manager():
            refs = self._reference_halves(model, inputs, n)
            with torch.no_grad(), rng.record():
                rejected_value = self.logps(model, rejected_rows)
            with self.accelerator.no_sync(model):  # the rejected pass below syncs both
                chosen = self.logps(model, chosen_rows)
                leaves = [chosen[0].detach().requires_grad_(), rejected_value[0].detach().requires_grad_()]
                with torch.enable_grad():
                    loss = self.pair_loss(model, (leaves[0], chosen[1]), (leaves[1], rejected_value[1]),
                                          *refs) * scale
                coef_chosen, coef_rejected = torch.autograd.grad(loss, leaves)
                self.accelerator.backward((chosen[0] * coef_chosen).sum())
                del chosen
            with rng.replay():
                rejected = self.logps(model, rejected_rows)
        self.accelerator.backward((rejected[0] * coef_rejected).sum())
        return loss.detach()

    def _can_split(self) -> bool:
        """Only where two backward passes per micro-batch are safe (not DeepSpeed/FSDP)."""
        return (self.align.pref_split_backward and not self.is_deepspeed_enabled
                and not self.is_fsdp_enabled and self.args.n_gpu <= 1
                and not getattr(self.args, "parallelism_config", None))

    def _record_pairs(self, model: Any, out: Any, chosen_logps: Any, rejected_logps: Any,
                      n: int) -> None:
        margins = out.chosen_rewards - out.rejected_rewards
        for key, value in (("rewards/chosen", out.chosen_rewards),
                           ("rewards/rejected", out.rejected_rewards),
                           ("rewards/margins", margins),
                           ("rewards/accuracies", (margins > 0).float()),
                           ("logps/chosen", chosen_logps), ("logps/rejected", rejected_logps)):
            self.record(model, key, value.float().sum().item(), n)


def _pair_halves(inputs: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(pairs, the chosen side's rows, the rejected side's rows) of a dpo batch: the halves of a
    padded one; the first `chosen_rows` rows of a padding-free one, and the rest."""
    if "seq_index" in inputs:
        k = int(inputs["chosen_rows"])
        shape = inputs["seq_index"].shape  # the per-token tensors (not kto_tag: one per row)
        tensors = {key: v for key, v in inputs.items() if torch.is_tensor(v) and v.shape == shape}

        def side(rows: slice) -> dict[str, Any]:  # without the columns that are padding in all its rows
            used = int(torch.nonzero((inputs["seq_index"][rows] >= 0).any(0)).max()) + 1
            return {key: v[rows, :used] for key, v in tensors.items()}

        return (int(inputs["seq_index"].max()) + 1) // 2, side(slice(None, k)), side(slice(k, None))
    n = inputs["input_ids"].shape[0] // 2
    return n, {k: v[:n] for k, v in inputs.items()}, {k: v[n:] for k, v in inputs.items()}


class _RngReplay:
    """Record the random state before a pass and replay it later (same dropout masks),
    then continue the stream where it would have been without the replay."""

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.start: Any = None

    def _get(self) -> Any:
        return (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None)

    def _set(self, state: Any) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.start = self._get()
        yield

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        after = self._get()
        self._set(self.start)
        try:
            yield
        finally:
            self._set(after)


class KTOTrainer(PolicyReferenceTrainer):
    def __init__(self, *args: Any, align: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.align = align

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Mean over examples of the weighted KTO loss; metrics recorded."""
        a = self.align
        if "seq_index" in inputs:  # padding-free (PaddingFreeKTOCollator): the rows, then the KL rows
            n, rows, kl_rows = _pair_halves(inputs)
            logps, _ = self.logps(model, rows)
            with torch.no_grad():
                kl_logps, _ = self.logps(model, kl_rows)
            both = inputs
        else:
            logps, _ = self.logps(model, inputs)
            with torch.no_grad():
                kl_logps, _ = self.logps(model, inputs, prefix="kl_")
            n = logps.shape[0]
            both = {k: torch.cat([inputs[k], inputs[f"kl_{k}"]])
                    for k in ("input_ids", "attention_mask", "labels")}
        ref_all, _ = self.reference_logps(model, both)  # one pass: rows and KL rows share a width
        ref_logps, ref_kl_logps = ref_all[:n], ref_all[n:]
        tags = inputs["kto_tag"].bool()
        # the reference point z0 is the KL estimate of the whole batch, over every process
        # (one process with the same global batch gets the same z0)
        gather = self.accelerator.gather
        out = kto_loss(logps, ref_logps, tags, gather(kl_logps), gather(ref_kl_logps), beta=a.pref_beta,
                       chosen_weight=a.kto_chosen_weight, rejected_weight=a.kto_rejected_weight)
        self.record(model, "rewards/chosen", out.rewards[tags].sum().item(), tags.sum().item())
        self.record(model, "rewards/rejected", out.rewards[~tags].sum().item(), (~tags).sum().item())
        self.record(model, "kl", out.kl.item(), 1)
        loss = out.losses.mean()
        return (loss, None) if return_outputs else loss


class PairwiseTrainer(Trainer):
    """The pairwise loss, averaged over every pair of the accumulated batch: the Trainer
    counts the pairs of all its micro-batches (get_batch_samples) and each micro-batch
    contributes sum(loss) / pairs, so accumulation equals one large batch even when the
    last micro-batch is smaller."""

    loss_is_scaled_for_ga = True

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        pairs = torch.tensor(sum(batch_pairs(b) for b in batches), device=device)
        return batches, pairs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = pair_rewards(model, inputs)
        losses = pairwise_loss(chosen, rejected)
        loss = losses.mean() if num_items_in_batch is None else losses.sum() / num_items_in_batch
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            chosen, rejected = pair_rewards(model, inputs)
            loss = pairwise_loss(chosen, rejected).mean().detach()
        if prediction_loss_only:
            return loss, None, None
        # labels are a placeholder: the Trainer only calls compute_metrics when there are some
        return loss, torch.stack([chosen, rejected], -1).detach(), torch.zeros_like(chosen)


class SpanTrainer(Trainer):
    """qa: the start and end cross-entropies over the real tokens of each feature only. The
    model's own loss also spreads probability over the padding of the batch, so the same
    features gave other losses in other batches (or processes); here padding is masked out, and
    a mean over the micro-batch's features (equal micro-batches average to the batch's mean)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # a mean over the micro-batch (mean_loss_trainer's reason)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {k: inputs[k] for k in ("start_positions", "end_positions")}
        outputs = model(**{k: v for k, v in inputs.items() if k not in targets})
        padding = inputs["attention_mask"] == 0
        loss = sum(torch.nn.functional.cross_entropy(outputs[k].float().masked_fill(padding, float("-inf")),
                                                     targets[t])
                   for k, t in (("start_logits", "start_positions"), ("end_logits", "end_positions"))) / 2
        return (loss, outputs) if return_outputs else loss


class EmbeddingTrainer(Trainer):
    """embed: the bare model's token vectors, pooled per text (`pooling`), under a contrastive
    loss (in-batch negatives) or, for scored pairs, a cosine loss (lathe.recipes.embed). Its
    prediction step returns each pair's two vectors (and the score as the label), which the
    retrieval metrics rank."""

    pooling = "mean"
    temperature = 0.05

    def _embed(self, model: Any, inputs: dict[str, Any]) -> list[Any]:
        """The pooled vectors of each block (anchor, positive, negative where given), from one
        forward over the blocks side by side, right-padded to the widest: DDP and DeepSpeed follow
        one forward per backward."""
        names = [n for n in ("anchor", "positive", "negative") if f"{n}_input_ids" in inputs]
        width = max(inputs[f"{n}_input_ids"].shape[1] for n in names)
        pad_id = self.processing_class.pad_token_id or 0

        def widen(t: Any, value: int) -> Any:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        ids = torch.cat([widen(inputs[f"{n}_input_ids"], pad_id) for n in names])
        mask = torch.cat([widen(inputs[f"{n}_attention_mask"], 0) for n in names])
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return list(pool(hidden, mask, self.pooling).split([inputs[f"{n}_input_ids"].shape[0] for n in names]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchors, positives, *negatives = self._embed(model, inputs)
        if "scores" in inputs:
            loss = cosine_loss(anchors, positives, inputs["scores"])
        else:
            candidates, first = across_processes(positives)  # the global batch's, in several processes
            if negatives:
                candidates = torch.cat([candidates, across_processes(negatives[0])[0]])
            loss = contrastive_loss(anchors, candidates, self.temperature, first)
        return (loss, {"vectors": torch.stack([anchors, positives], dim=1)}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        labels = inputs.get("scores")
        if labels is None:
            labels = torch.full((outputs["vectors"].shape[0],), float("nan"), device=loss.device)
        return loss.detach(), outputs["vectors"].detach(), labels.detach()
