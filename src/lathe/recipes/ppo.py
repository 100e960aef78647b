"""PPO (stage ppo): sample replies to prompts, score them with a reward model, and
push the policy towards higher scores while a KL penalty keeps it near the reference.

Read `run` top to bottom; the maths is in `ppo_core` (tested on its own).

Batch sizes (the LLaMA-Factory meaning of the keys):
- a PPO step samples one *rollout batch* of
  per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size prompts,
  generated in chunks of per_device_train_batch_size;
- it then runs ppo_epochs passes over that batch, shuffled into mini-batches of
  per_device_train_batch_size, with one optimizer step every gradient_accumulation_steps
  mini-batches (so ppo_buffer_size optimizer steps per epoch).
With the defaults (1 and 1) each step is "one batch of prompts, ppo_epochs updates".
max_steps counts PPO steps; without it, num_train_epochs passes over the prompts.

The reference policy: the adapter being continued (adapter_name_or_path, e.g. the SFT
run's) as it was at the start, or the base model for a fresh adapter; a frozen copy of
the model (or ref_model) for full / freeze tuning. Dropout is switched off so the
policy ratio is exactly 1 before the first update. No intermediate checkpoints
(save_steps is not used).

Several processes (torchrun, nproc_per_node; DDP or DeepSpeed ZeRO-2/3 through lathe.loop): the
batch sizes above are per process, as in the Trainer's stages. Each process samples, scores and
trains on its share of every rollout batch, and the policy with its value head is trained by the
engine (torch DDP, or a DeepSpeed engine), so every optimizer step follows the gradient of the
whole mini-batch. Under ZeRO-3 the replies are generated with the policy's weights gathered, and
the reference and reward models are sharded inference engines. What PPO computes over a batch is computed over
all processes' rows: the whitening of advantages and rewards, the running score moments, the
KL that steers kl_coef, the token weighting of the losses, and every logged figure. With greedy
decoding, 2 processes at batch 4 train as 1 process at batch 8 under DDP, ZeRO-2, ZeRO-3 and ZeRO-3
with offload (tests/e2e/test_stage_ppo.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.inspect import mark_trained
from lathe.data.processors import IGNORE_INDEX
from lathe.distributed import Peers
from lathe.errors import ConfigError
from lathe.files import respect_umask
from lathe.infer import left_pad, set_stop_tokens
from lathe.loop import Updates, update_engine
from lathe.model.adapters import apply_finetuning
from lathe.model.load import load_model, pick_dtype, resolve_model_path
from lathe.model.reward import read_marker
from lathe.recipes.common import RunResult, build_training_args, log, open_stage, print_summary, start_run


def run(cfg: LatheConfig) -> RunResult:
    _check_supported(cfg)
    rm_info = read_marker(cfg.align.reward_model)  # not a reward model: one line, now
    o = open_stage(cfg, training_args=False)  # ppo runs its own loop
    tokenizer, data, notes, model_path, template = o.tokenizer, o.data, o.notes, o.model_path, o.template
    if rm_info.get("template") not in (None, cfg.data.template):
        notes.append(f"the reward model was trained with template {rm_info['template']}, "
                     f"this run renders prompts with {cfg.data.template}")

    from lathe.model.reward import load_reward_model
    from lathe.model.value_head import VALUE_HEAD_FILE, PolicyWithValueHead, disable_dropout

    # DeepSpeed: its config's "auto" values come from TrainingArguments, made before the models
    # load so that ZeRO-3 shards them as they load (kept for the whole run: transformers holds it weakly)
    ds_args = build_training_args(cfg, has_eval=False) if cfg.train.extra.get("deepspeed") else None
    peers = Peers(int(cfg.train.extra.get("ddp_timeout", 1800)))
    device = peers.device
    policy = apply_finetuning(load_model(cfg, model_path, tokenizer), cfg.finetune, cfg.model)
    reference, ref_note = _reference(cfg, policy, model_path)
    notes.append(ref_note)
    reward_model = load_reward_model(cfg.align.reward_model, pick_dtype(cfg), tokenizer,
                                     cfg.model.trust_remote_code)
    model = PolicyWithValueHead(policy)
    previous = (cfg.model.adapter_name_or_path or [model_path])[-1]
    if (Path(previous) / VALUE_HEAD_FILE).is_file():
        model.load_value_head(previous)  # continuing a ppo run: its critic too
        notes.append(f"value head continued from {previous}")
    disable_dropout(model)
    if cfg.train.gradient_checkpointing:  # the non-reentrant kind: the one DDP's backward hooks follow
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(policy, "enable_input_require_grads"):
            policy.enable_input_require_grads()
    model.to(device)

    plan = Plan.of(cfg, len(data.train), peers.world)
    engine = _engine(cfg, peers, model, plan, ds_args)
    reward_model = engine.frozen(reward_model)
    reference = engine.frozen(reference) if reference is not None else None
    notes.append(plan.describe())
    notes.append(f"reward model {cfg.align.reward_model}")

    start_run(cfg, o)
    peers.barrier()  # the run directory exists before any process writes into it
    example = data.train[0]["input_ids"]
    print_summary(cfg, model, model_path, data,
                  mark_trained(example, [IGNORE_INDEX] * len(example), tokenizer, color=False), notes,
                  example_caption="a prompt; the replies are sampled")

    stop_ids = template.stop_token_ids(tokenizer)
    ppo = PPO(cfg, model, reference, reward_model, tokenizer, stop_ids, peers, engine)
    history = ppo.train(data.train, plan)
    train_metrics = _summarise(history)
    eval_metrics = ppo.evaluate(data.eval) if data.eval is not None else {}
    if eval_metrics:
        log(f"Eval reward {eval_metrics['eval_reward']:.4f}, kl {eval_metrics['eval_kl']:.4f}")
    metrics = {**train_metrics, **eval_metrics}

    _save(cfg, model, engine, tokenizer, stop_ids, history, train_metrics, metrics, plan)
    peers.barrier()
    log(f"Saved {cfg.finetune.finetuning_type} weights, value head, tokenizer and config to "
        f"{cfg.train.output_dir}")
    return RunResult(cfg.train.output_dir, metrics, policy, tokenizer, history)


# --- checks and setup ------------------------------------------------------------------------

def _check_supported(cfg: LatheConfig) -> None:
    if cfg.train.resume_from_checkpoint:
        raise ConfigError("ppo cannot resume from a checkpoint yet; remove resume_from_checkpoint "
                          "(to continue a ppo run, give its output_dir as adapter_name_or_path)")
    if cfg.data.streaming:
        raise ConfigError("ppo reads its prompts into memory; set streaming: false")
    if cfg.generate.num_beams != 1:
        raise ConfigError(f"ppo samples its replies from the policy; num_beams={cfg.generate.num_beams} "
                          "must be 1")
    if cfg.generate.repetition_penalty != 1.0:
        raise ConfigError("ppo samples its replies from the policy itself; repetition_penalty must be 1.0")
    if cfg.train.do_train is False:
        raise ConfigError("stage ppo with do_train: false has nothing to do; remove do_train")


def _reference(cfg: LatheConfig, policy: Any, model_path: str) -> tuple[Any | None, str]:
    """(a separate frozen reference model or None, a note for the summary)."""
    from lathe.model.reference import add_reference_adapter, is_peft, load_reference_model

    if cfg.align.ref_model:
        path = resolve_model_path(cfg.align.ref_model)
        return (load_reference_model(path, pick_dtype(cfg), cfg.model.trust_remote_code),
                f"reference model {path}")
    if is_peft(policy):
        adapters = cfg.model.adapter_name_or_path or []
        if adapters and not cfg.finetune.create_new_adapter:
            add_reference_adapter(policy, adapters[-1])
            return None, f"reference: the adapter {adapters[-1]} as loaded (frozen copy)"
        merged = " with the given adapters merged" if adapters else ""
        return None, f"reference: the base model{merged} (the new adapter disabled)"
    return (load_reference_model(model_path, pick_dtype(cfg), cfg.model.trust_remote_code),
            f"reference: a frozen copy of {model_path}")


@dataclass(frozen=True)
class Plan:
    """How many prompts per PPO step, how they are split, and how long the run is
    (rollout_size: over all processes; minibatch: per process)."""

    rollout_size: int
    minibatch: int
    accumulation: int
    steps: int
    optimizer_steps: int
    num_prompts: int
    processes: int = 1

    @classmethod
    def of(cls, cfg: LatheConfig, num_prompts: int, processes: int = 1) -> Plan:
        t, a = cfg.train, cfg.align
        per_process = t.per_device_train_batch_size * t.gradient_accumulation_steps * a.ppo_buffer_size
        rollout = per_process * processes
        if t.max_steps > 0:
            steps = t.max_steps
        else:
            steps = max(1, math.ceil(t.num_train_epochs * num_prompts / rollout))
        minibatches = math.ceil(per_process / t.per_device_train_batch_size)
        per_step = a.ppo_epochs * math.ceil(minibatches / t.gradient_accumulation_steps)
        return cls(rollout, t.per_device_train_batch_size, t.gradient_accumulation_steps,
                   steps, steps * per_step, num_prompts, processes)

    def describe(self) -> str:
        split = (f", {self.rollout_size // self.processes} per process" if self.processes > 1 else "")
        return (f"ppo: {self.steps} steps of {self.rollout_size} prompts (of {self.num_prompts}{split}), "
                f"mini-batches of {self.minibatch}, an optimizer step every {self.accumulation}; "
                f"{self.optimizer_steps} optimizer steps in all")


def _engine(cfg: LatheConfig, peers: Peers, model: Any, plan: Plan, ds_args: Any) -> Updates:
    """AdamW and the scheduler over the trained parameters, in the run's update engine (one
    process, DDP, or DeepSpeed ZeRO when ds_args are given)."""
    import torch
    from transformers import get_scheduler

    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * plan.optimizer_steps)

    def scheduler_for(opt: Any) -> Any:
        return get_scheduler(t.lr_scheduler_type, opt, num_warmup_steps=warmup,
                             num_training_steps=plan.optimizer_steps)

    return update_engine(peers, model, optimizer, scheduler_for, accumulation=t.gradient_accumulation_steps,
                         max_grad_norm=t.max_grad_norm, deepspeed_args=ds_args,
                         num_training_steps=plan.optimizer_steps, sizes_from=model.policy)


# --- the loop ------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One rollout batch: prompts left-padded to a common length P, replies after them."""

    sequences: Any  # (batch, P + R) prompt + reply token ids
    attention_mask: Any  # (batch, P + R)
    prompt_len: int  # P
    mask: Any  # (batch, R) 1 on reply tokens (up to and including the first stop token)
    scores: Any = None  # (batch,) reward model scores
    logprobs: Any = None  # (batch, R) at rollout time
    ref_logprobs: Any = None
    values: Any = None
    advantages: Any = None
    returns: Any = None


class PPO:
    """Rollouts, scoring, advantages and clipped updates for one policy with a value head."""

    def __init__(self, cfg: LatheConfig, model: Any, reference: Any | None, reward_model: Any,
                 tokenizer: Any, stop_ids: list[int], peers: Peers, engine: Updates) -> None:
        from lathe.recipes.ppo_core import make_kl_controller

        self.cfg, self.a = cfg, cfg.align
        self.model, self.reference, self.reward_model = model, reference, reward_model
        self.peers = peers
        self.engine = engine  # what the updates run through (DDP, DeepSpeed); rollouts use the model
        self.tokenizer, self.stop_ids, self.device = tokenizer, stop_ids, peers.device
        self.pad_id = tokenizer.pad_token_id
        self.mb = cfg.train.per_device_train_batch_size
        g = cfg.generate
        self.temperature = g.temperature if g.do_sample else 1.0
        self.kl_ctl = make_kl_controller(self.a.ppo_init_kl_coef, self.a.ppo_target, self.a.ppo_kl_horizon)
        self.score_moments = None
        if self.a.ppo_score_norm:
            from lathe.recipes.ppo_core import RunningMoments

            self.score_moments = RunningMoments()

    # -- one PPO step, in order --

    def train(self, prompts: Any, plan: Plan) -> list[dict[str, Any]]:
        import torch
        from tqdm.auto import tqdm

        out = Path(self.cfg.train.output_dir)
        peers, seed = self.peers, self.cfg.train.seed
        # the prompts of each step (the same on every process, which takes its share) and the
        # mini-batch shuffles: two streams, so one never shifts the other
        batches = _prompt_batches(len(prompts), plan.rollout_size, torch.Generator().manual_seed(seed))
        shuffles = torch.Generator().manual_seed(seed + 1)
        if peers.world > 1:
            torch.manual_seed(seed + peers.rank)  # each process samples its own replies
        history: list[dict[str, Any]] = []
        t0 = time.time()
        bar = tqdm(total=plan.steps, desc="ppo", unit="step", dynamic_ncols=True, disable=not peers.main)
        seen = tokens = 0
        for step in range(1, plan.steps + 1):
            idx = next(batches)
            seen += len(idx)
            rollout = self.rollout([prompts[i]["input_ids"] for i in peers.shard(idx)])
            tokens += int(peers.sum(rollout.attention_mask.sum()))  # prompt + reply tokens, no padding
            stats = self.prepare(rollout)
            stats.update(self.optimise(rollout, shuffles))
            self.kl_ctl.update(stats["kl"], len(idx))
            record = {"step": step, "max_steps": plan.steps, "epoch": round(seen / plan.num_prompts, 4),
                      "elapsed_s": round(time.time() - t0, 2), "num_input_tokens_seen": tokens,
                      **_rounded(stats),
                      "learning_rate": self.engine.last_lr}
            history.append(record)
            if peers.main:
                with open(out / "trainer_log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
        bar.close()
        history[-1]["train_runtime"] = round(time.time() - t0, 2)
        return history

    def rollout(self, prompts: list[list[int]]) -> Rollout:
        """Sample replies (in chunks of the mini-batch size); everything after a reply's
        first stop token is padding."""
        import torch

        from lathe.recipes.ppo_core import response_mask

        ids, attn = left_pad(prompts, self.pad_id, self.device)
        gen = self._generation_config()
        replies = []
        self.model.eval()
        with torch.no_grad(), self.engine.gathered():  # ZeRO-3: whole weights while generating
            for s in range(0, len(prompts), self.mb):
                out = self.model.generate(input_ids=ids[s:s + self.mb], attention_mask=attn[s:s + self.mb],
                                          generation_config=gen)
                replies.append(out[:, ids.shape[1]:])
        width = max(r.shape[1] for r in replies)
        reply = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=self.pad_id)
                           for r in replies])
        mask = response_mask(reply, self.stop_ids)
        reply = torch.where(mask.bool(), reply, torch.full_like(reply, self.pad_id))
        return Rollout(torch.cat([ids, reply], 1), torch.cat([attn, mask], 1), ids.shape[1], mask)

    def prepare(self, r: Rollout) -> dict[str, float]:
        """Scores, log-probs and values at rollout time, rewards and advantages; the batch
        statistics (whitening, score moments, logged figures) over every process's rows."""
        import torch

        from lathe.recipes.ppo_core import compute_rewards, gae, masked_whiten

        peers = self.peers
        with torch.no_grad():
            r.scores = self.score(r)
            r.logprobs, r.values = self._policy_pass(r)
            r.ref_logprobs = self._reference_pass(r)
        all_scores = peers.gather(r.scores)
        scores = self.score_moments.normalise(r.scores, all_scores) if self.score_moments else r.scores
        rewards, kl = compute_rewards(scores, r.logprobs, r.ref_logprobs, r.mask, self.kl_ctl.value)
        if self.a.ppo_whiten_rewards:
            rewards = masked_whiten(rewards, r.mask, shift_mean=False, reduce=peers.sum)
        advantages, r.returns = gae(rewards, r.values, r.mask, self.a.ppo_gamma, self.a.ppo_lam)
        r.advantages = masked_whiten(advantages, r.mask, reduce=peers.sum)
        kl_rows = peers.gather(kl.sum(1))
        value_sum, tokens = peers.sum(torch.stack([(r.values * r.mask).sum(), r.mask.sum().to(r.values.dtype)]))
        return {"reward": all_scores.mean().item(), "kl": kl_rows.mean().item(),
                "kl_coef": self.kl_ctl.value,
                "non_score_reward": (-self.kl_ctl.value * kl_rows).mean().item(),
                "value_mean": (value_sum / tokens.clamp(min=1)).item(),
                "response_length": peers.gather(r.mask.sum(1).float()).mean().item()}

    def optimise(self, r: Rollout, generator: Any) -> dict[str, float]:
        """ppo_epochs passes of shuffled mini-batches; an optimizer step every
        gradient_accumulation_steps mini-batches (and at the end of each pass).

        Each loss is a mean over the reply tokens of the mini-batch. With several processes the
        mini-batch is every process's share of it: a process weighs its own mean by
        processes x its tokens / all tokens, so DDP's average of the gradients is the gradient
        of the whole mini-batch's mean (and so are the logged figures); DeepSpeed averages as DDP does."""
        import torch

        from lathe.recipes.ppo_core import (
            entropy_from_logits,
            masked_mean,
            policy_loss,
            token_logprobs,
            value_loss,
        )

        n, ga = r.sequences.shape[0], self.cfg.train.gradient_accumulation_steps
        peers, engine = self.peers, self.engine
        sums: dict[str, float] = {}
        count = 0
        self.model.train()
        for _ in range(self.a.ppo_epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            chunks = list(torch.split(order, self.mb))
            for k, idx in enumerate(chunks):
                stepping = (k + 1) % ga == 0 or k + 1 == len(chunks)
                mask = r.mask[idx]
                mine = mask.sum()
                weight = float(peers.world * mine) / max(1.0, float(peers.sum(mine)))  # 1 in one process
                logits, values = engine(r.sequences[idx], r.attention_mask[idx], stepping=stepping)
                logits = logits[:, r.prompt_len - 1:-1] / self.temperature
                logp = token_logprobs(logits, r.sequences[idx, r.prompt_len:])
                vpred = values[:, r.prompt_len - 1:-1]
                pg, pg_stats = policy_loss(logp, r.logprobs[idx], r.advantages[idx], mask,
                                           self.a.ppo_cliprange)
                vf, vf_stats = value_loss(vpred, r.values[idx], r.returns[idx], mask,
                                          self.a.ppo_cliprange_value)
                engine.backward((pg + self.a.ppo_vf_coef * vf) * weight, stepping=stepping)
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits), mask)
                for key, value in (("policy_loss", pg), ("value_loss", vf), ("entropy", entropy),
                                   *pg_stats.items(), *vf_stats.items()):
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) * weight
                count += 1
        self.model.eval()
        totals = peers.sum(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()
        return {k: v / (count * peers.world) for k, v in zip(sums, totals)}

    # -- the passes --

    def score(self, r: Rollout) -> Any:
        """The reward model's score of prompt + reply, right padded (its own layout)."""
        import torch

        from lathe.model.reward import reward_scores

        rows = [seq[att.bool()].tolist() for seq, att in zip(r.sequences, r.attention_mask)]
        scores = []
        for s in range(0, len(rows), self.mb):
            ids, attn = _right_pad(rows[s:s + self.mb], self.pad_id, self.device)
            scores.append(reward_scores(self.reward_model, ids, attn))
        return torch.cat(scores).float()

    def _policy_pass(self, r: Rollout) -> tuple[Any, Any]:
        import torch

        from lathe.recipes.ppo_core import response_logprobs

        logps, values = [], []
        for s in range(0, r.sequences.shape[0], self.mb):
            seq, attn = r.sequences[s:s + self.mb], r.attention_mask[s:s + self.mb]
            logits, v = self.model(seq, attn)
            logps.append(response_logprobs(logits, seq, r.prompt_len, self.temperature))
            values.append(v[:, r.prompt_len - 1:-1].float())
        return torch.cat(logps), torch.cat(values) * r.mask

    def _reference_pass(self, r: Rollout) -> Any:
        import torch

        from lathe.model.reference import as_reference
        from lathe.model.value_head import position_ids_for
        from lathe.recipes.ppo_core import response_logprobs

        logps = []
        for s in range(0, r.sequences.shape[0], self.mb):
            seq, attn = r.sequences[s:s + self.mb], r.attention_mask[s:s + self.mb]
            kwargs = dict(input_ids=seq, attention_mask=attn, position_ids=position_ids_for(attn),
                          use_cache=False)
            if self.reference is not None:
                logits = self.reference(**kwargs).logits
            else:
                with as_reference(self.model.policy) as ref:
                    logits = ref(**kwargs).logits
            logps.append(response_logprobs(logits, seq, r.prompt_len, self.temperature))
        return torch.cat(logps)

    def evaluate(self, prompts: Any) -> dict[str, float]:
        """Mean score and KL of replies to the eval prompts, with the trained policy (each
        process answers every world-th prompt; the means are over all of them)."""
        import torch

        from lathe.recipes.ppo_core import compute_rewards

        mine = list(range(self.peers.rank, len(prompts), self.peers.world))
        scores, kls = [], []
        for s in range(0, len(mine), self.mb):
            r = self.rollout([prompts[i]["input_ids"] for i in mine[s:s + self.mb]])
            with torch.no_grad():
                r.scores = self.score(r)
                logp, _ = self._policy_pass(r)
                _, kl = compute_rewards(r.scores, logp, self._reference_pass(r), r.mask, 0.0)
            scores += r.scores.tolist()
            kls += kl.sum(1).tolist()
        score_sum, kl_sum, n = self.peers.sum(torch.tensor([sum(scores), sum(kls), len(scores)],
                                                           dtype=torch.float64)).tolist()
        return {"eval_reward": score_sum / n, "eval_kl": kl_sum / n}

    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        g = self.cfg.generate
        sampling = dict(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k) if g.do_sample else {}
        return GenerationConfig(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, num_beams=1,
                                repetition_penalty=1.0, eos_token_id=self.stop_ids,
                                pad_token_id=self.pad_id, **sampling)


def _prompt_batches(n: int, size: int, generator: Any):
    """Endless rollout batches of prompt indices: each epoch a fresh shuffle; a batch never
    holds one prompt twice (the last batch of an epoch may be smaller)."""
    import torch

    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for s in range(0, n, size):
            yield order[s:s + size]


def _right_pad(rows: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, attn


def _rounded(stats: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in stats.items()}


# --- results ----------------------------------------------------------------------------------

def _summarise(history: list[dict[str, Any]]) -> dict[str, float]:
    """Mean score over the first and last tenth of the steps (at least one step each),
    the final KL, and the run's size."""
    window = max(1, len(history) // 10)

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return round(sum(h[key] for h in rows) / len(rows), 6)

    return {"reward_first": mean(history[:window], "reward"), "reward_last": mean(history[-window:], "reward"),
            "reward_window_steps": window, "kl_final": history[-1]["kl"],
            "kl_coef_final": history[-1]["kl_coef"], "train_steps": len(history),
            "train_runtime": history[-1].get("train_runtime", 0.0), "epoch": history[-1]["epoch"],
            "num_input_tokens_seen": history[-1]["num_input_tokens_seen"]}


def _save(cfg: LatheConfig, model: Any, engine: Updates, tokenizer: Any, stop_ids: list[int],
          history: list[dict[str, Any]], train_metrics: dict[str, float], metrics: dict[str, float],
          plan: Plan) -> None:
    """Weights (the trained adapter only, or the full model), tokenizer, value head, state,
    plot; all_results.json last (it marks the run complete). Every process calls it (ZeRO-3
    gathers the sharded tensors); the main process writes."""
    from lathe.model.reference import REF_ADAPTER, is_peft

    out = Path(cfg.train.output_dir)
    policy = model.policy
    peft = is_peft(policy)
    if peft and REF_ADAPTER in policy.peft_config:
        policy.delete_adapter(REF_ADAPTER)  # the run directory holds just the trained adapter
    weights = engine.state_dict(policy, trainable_only=peft)  # None: the model holds them whole
    head = engine.state_dict(model.value_head, trainable_only=False)
    if not engine.peers.main:
        return
    set_stop_tokens(policy, stop_ids)
    policy.save_pretrained(str(out), **({} if weights is None else {"state_dict": weights}))
    tokenizer.save_pretrained(str(out))
    model.save_value_head(out, head)
    state = {"global_step": len(history), "max_steps": plan.steps, "epoch": metrics["epoch"],
             "optimizer_steps": plan.optimizer_steps, "log_history": history}
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    if cfg.finetune.plot_loss:
        from lathe.recipes.plots import plot_metric

        for key in ("reward", "kl"):
            path = plot_metric(str(out), history, key, f"training_{key}.png")
            if path is not None:
                log(f"Saved {path}")
    (out / "train_results.json").write_text(json.dumps(train_metrics, indent=2) + "\n", encoding="utf-8")
    if len(metrics) > len(train_metrics):
        eval_only = {k: v for k, v in metrics.items() if k not in train_metrics}
        (out / "eval_results.json").write_text(json.dumps(eval_only, indent=2) + "\n", encoding="utf-8")
    respect_umask(out)
    (out / "all_results.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
