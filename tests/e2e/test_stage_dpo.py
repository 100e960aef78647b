"""Stages dpo (sigmoid, orpo, simpo) and kto on a tiny model with an easy preference signal.

The implicit reward margin (chosen minus rejected) must rise over a short run; the
LoRA reference must cost no model copy; continuing an SFT adapter must make that
adapter the reference (margin 0 at step 0) and leave no "ref" folder behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lathe
from tests.conftest import logged, run_cli, write_yaml

TOPICS = ["the sea", "a tree", "the moon", "bread", "a river", "music", "the city", "a cat"]
GOOD, BAD = "Yes, gladly. It is good.", "No."


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory) -> Path:
    """32 preference pairs and 32 KTO rows: the good reply is always the same sentence."""
    d = tmp_path_factory.mktemp("pref")
    prompts = [f"Tell me about {t}, please ({i})." for i in range(4) for t in TOPICS]
    pairs = [{"instruction": p, "input": "", "chosen": GOOD, "rejected": BAD} for p in prompts]
    kto = [{"instruction": p, "input": "", "output": GOOD if i % 2 == 0 else BAD, "kto_tag": i % 2 == 0}
           for i, p in enumerate(prompts)]
    (d / "pairs.json").write_text(json.dumps(pairs))
    (d / "kto.json").write_text(json.dumps(kto))
    info = {"pairs": {"file_name": "pairs.json", "ranking": True}, "kto_rows": {"file_name": "kto.json"}}
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


@pytest.fixture()
def args(tiny_model, pref_dir, tmp_path) -> dict:
    return {"stage": "dpo", "model_name_or_path": str(tiny_model), "dataset": "pairs",
            "dataset_dir": str(pref_dir), "template": "chatml", "cutoff_len": 64,
            "lora_target": "all", "per_device_train_batch_size": 8, "learning_rate": 5e-3,
            "max_steps": 8, "logging_steps": 1, "save_steps": 1000,
            "output_dir": str(tmp_path / "run"), "seed": 0}


def _margins(history: list[dict], prefix: str = "") -> list[float]:
    return [h[f"{prefix}rewards/margins"] for h in history if f"{prefix}rewards/margins" in h]


def _base_params(tiny_model: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())


# --- the margin rises --------------------------------------------------------------------------

def test_dpo_sigmoid_through_the_cli(args, tmp_path):
    cfg = write_yaml(tmp_path / "dpo.yaml", args)
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Path(args["output_dir"])
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    margins = _margins(logs)
    assert len(margins) == 8
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    assert margins[-1] > 0.5, margins
    assert logs[-2]["rewards/accuracies"] == 1.0 and logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    saved = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "all_results.json", "trainer_state.json"} <= saved


@pytest.mark.parametrize("pref_loss", ["orpo", "simpo"])
def test_reference_free_losses_raise_the_margin_without_a_reference(args, pref_loss, monkeypatch):
    from lathe.config.load import load_config
    from lathe.recipes import dpo
    from lathe.recipes.preference import train_and_save

    cfg = load_config({**args, "pref_loss": pref_loss, "learning_rate": 1e-2})
    setup = dpo.build(cfg)
    assert setup.trainer.ref_model is None and not setup.trainer.use_reference

    def no_reference(*a, **k):
        raise AssertionError("a reference-free loss ran the reference")

    monkeypatch.setattr(setup.trainer, "reference_logps", no_reference)
    result = train_and_save(setup, cfg)
    margins = _margins(result.log_history)
    assert margins[-1] - margins[0] > 0.05, margins


def test_kto_raises_the_margin_and_reports_eval_metrics(args, tmp_path):
    result = lathe.train({**args, "stage": "kto", "dataset": "kto_rows", "val_size": 8, "eval_steps": 1000})
    margins = _margins(result.log_history)
    assert margins[0] == pytest.approx(0.0, abs=1e-6)
    assert margins[-1] > 0.5, margins
    assert any("kl" in h for h in result.log_history)
    saved = json.loads((Path(args["output_dir"]) / "all_results.json").read_text())
    assert saved["eval_rewards/margins"] > 0.5 and "eval_loss" in saved


# --- memory: the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("finetuning_type, pref_loss, copies", [
    ("lora", "sigmoid", 1), ("full", "sigmoid", 2), ("full", "simpo", 1)])
def test_reference_memory(args, tiny_model, finetuning_type, pref_loss, copies):
    from lathe.config.load import load_config
    from lathe.model.adapters import count_parameters
    from lathe.recipes import dpo
    from lathe.recipes.preference import held_parameters

    setup = dpo.build(load_config({**args, "finetuning_type": finetuning_type, "pref_loss": pref_loss}))
    base = _base_params(tiny_model)
    lora = count_parameters(setup.trainer.model)[0] if finetuning_type == "lora" else 0
    assert held_parameters(setup.trainer) == copies * base + lora


def test_continuing_an_sft_adapter_makes_it_the_reference(args, tiny_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lathe.config.load import load_config
    from lathe.model.adapters import count_parameters
    from lathe.recipes import dpo
    from lathe.recipes.preference import held_parameters, train_and_save

    # an "SFT" adapter that really changes the model (random lora_B, not zeros)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                         LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft")

    cfg = load_config({**args, "adapter_name_or_path": str(tmp_path / "sft"), "max_steps": 4,
                       "save_steps": 2})
    setup = dpo.build(cfg)
    trainer, model = setup.trainer, setup.trainer.model
    assert held_parameters(trainer) == _base_params(tiny_model) + 2 * count_parameters(model)[0]

    batch = trainer.data_collator([setup.data.train[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        policy, _ = trainer.logps(model, batch)
        with model.disable_adapter():
            bare, _ = trainer.logps(model, batch)
    reference, _ = trainer.reference_logps(model, batch)
    model.train()
    assert torch.allclose(reference, policy, atol=1e-5)  # the reference is the SFT policy...
    assert (reference - bare).abs().max() > 1e-2  # ...not the bare base model

    result = train_and_save(setup, cfg)
    first = next(h for h in result.log_history if "rewards/chosen" in h)
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    assert _margins(result.log_history)[-1] > 0.1

    out = Path(result.output_dir)
    assert not (out / "ref").exists() and (out / "adapter_model.safetensors").is_file()
    for ckpt in ("checkpoint-2", "checkpoint-4"):  # checkpoints hold only the trained adapter too
        assert (out / ckpt / "adapter_model.safetensors").is_file() and not (out / ckpt / "ref").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    assert list(reloaded.peft_config) == ["default"]
    ids = batch["input_ids"][:2]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits,
                              atol=1e-5)


# --- mistakes --------------------------------------------------------------------------------

def test_dpo_on_sft_data_is_one_line(args, data_dir, tmp_path):
    cfg = write_yaml(tmp_path / "bad.yaml", {**args, "dataset": "identity", "dataset_dir": str(data_dir)})
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "rm/dpo" in lines[0] and "preference" in lines[0] and "ranking: true" in lines[0]


def test_kto_trains_at_batch_size_one(args):
    """The KL rows are made in the data, so batch 1 with accumulation works (LLaMA-Factory's
    KTO example trains that way)."""
    result = lathe.train({**args, "stage": "kto", "dataset": "kto_rows", "per_device_train_batch_size": 1,
                          "gradient_accumulation_steps": 4, "max_steps": 3})
    kl = [h["kl"] for h in result.log_history if "kl" in h]
    assert kl and all(k >= 0 for k in kl) and result.metrics["train_loss"] > 0


def test_kto_kl_term_equals_the_in_batch_estimate(args):
    """With one batch holding the whole dataset in order, the KL rows formed in the data
    (row i's prompt + row i+1's reply, cyclic) give the reference point the in-batch
    pairing gives; computed here by hand from the batch's own rows."""
    from lathe.config.load import load_config
    from lathe.data.collators import pad_rows
    from lathe.recipes import kto
    from lathe.recipes.losses import IGNORE_INDEX, sequence_logps

    cfg = load_config({**args, "stage": "kto", "dataset": "kto_rows", "max_samples": 12,
                       "per_device_train_batch_size": 12})
    setup = kto.build(cfg)
    trainer, rows = setup.trainer, list(setup.data.train)
    batch = trainer.data_collator(rows)
    model = trainer.model
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference (a fresh LoRA equals it)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    trainer.compute_loss(model, batch)
    kl_logged = trainer._stats["eval"]["kl"]
    data_kl = kl_logged[0] / kl_logged[1]

    def split(r):
        start = next(i for i, t in enumerate(r["labels"]) if t != IGNORE_INDEX)
        return r["input_ids"][:start], r["input_ids"][start:]

    parts = [split(r) for r in rows]
    in_batch = []
    for i, (prompt, _) in enumerate(parts):
        reply = parts[(i + 1) % len(parts)][1][:cfg.data.cutoff_len - len(prompt)]
        in_batch.append((prompt + reply, [IGNORE_INDEX] * len(prompt) + reply))
    padded = pad_rows(in_batch, trainer.processing_class.pad_token_id)
    with torch.no_grad():
        policy = sequence_logps(model(input_ids=padded["input_ids"],
                                      attention_mask=padded["attention_mask"]).logits, padded["labels"])[0]
        with trainer.reference(model) as ref:
            reference = sequence_logps(ref(input_ids=padded["input_ids"],
                                           attention_mask=padded["attention_mask"]).logits,
                                       padded["labels"])[0]
    assert [r["kl_input_ids"] for r in rows] == [ids for ids, _ in in_batch]
    assert [r["kl_labels"] for r in rows] == [lab for _, lab in in_batch]
    from lathe.recipes.trainers import _pair_halves

    assert "seq_index" in batch  # padding-free by default: the KL rows are the batch's second side
    with torch.no_grad():
        from_data = trainer.logps(model, _pair_halves(batch)[2])[0]
    assert torch.allclose(from_data, policy, atol=1e-5)
    assert float((policy - reference).abs().max()) > 1e-3  # the term is not trivially zero
    assert data_kl == pytest.approx(max(float((policy - reference).mean()), 0.0), abs=1e-6)


# --- padding-free pairs and fused log-probs (the defaults) against padded pairs -------------------

@pytest.mark.parametrize("keys", [{}, {"pref_split_backward": False, "finetuning_type": "full",
                                       "learning_rate": 1e-3}], ids=["lora-split", "full-joint"])
def test_padding_free_fused_dpo_trains_as_padded_pairs_do(args, keys, tmp_path):
    """The same 6 steps on padded pair batches with the model's logits, and on padding-free
    pairs with the log-probs from the hidden states (the defaults): the same logged losses and
    reward margins (1e-5) and the same saved weights; the summary says what was saved."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("padded", {"padding_free": False, "fused_loss": False}), ("free", {})):
        out = tmp_path / name
        cfg = write_yaml(tmp_path / f"{name}.yaml", {**args, **keys, **extra, "max_steps": 6, "val_size": 8,
                                                    "eval_steps": 3, "eval_strategy": "steps",
                                                    "output_dir": str(out)})
        proc = run_cli("train", str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (out, proc.stdout)
    (padded, _), (free, said) = runs["padded"], runs["free"]
    assert "padding-free batches: each side's replies in one row (varlen attention); padding" in said
    assert "fused loss: the output layer and log-probs" in said

    for key in ("loss", "rewards/margins", "eval_loss"):
        assert logged(free, key) and logged(free, key) == pytest.approx(logged(padded, key), rel=1e-5, abs=1e-6), key
    name = "model.safetensors" if keys else "adapter_model.safetensors"
    a, b = load_file(padded / name), load_file(free / name)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_padding_free_fused_kto_trains_as_padded_rows_do(args, tmp_path):
    """kto's log-probs (its rows, the mismatched KL rows, the reference's) on padded batches from
    the model's logits, and (the defaults) on padding-free batches from the hidden states and the
    output layer a chunk at a time: the same logged losses, KL and saved adapter."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("logits", {"fused_loss": False, "padding_free": False}), ("fused", {})):
        out = tmp_path / name
        cfg = write_yaml(tmp_path / f"{name}.yaml", {**args, **extra, "stage": "kto", "dataset": "kto_rows",
                                                    "max_steps": 5, "output_dir": str(out)})
        proc = run_cli("train", str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = out
        said = proc.stdout
    assert "fused loss: the output layer and log-probs" in said
    assert "padding-free batches: the rows, and apart their KL rows, in one row (varlen attention); padding" in said

    for key in ("loss", "kl", "rewards/chosen"):
        # kl is a mean of differences of summed log-probs (tens of nats): float32 rounding of those
        # sums in another order (measured 2e-6) is 1e-5 of a kl of 0.17
        assert logged(runs["fused"], key) == pytest.approx(logged(runs["logits"], key), rel=1e-5, abs=1e-5), key
    a, b = (load_file(runs[name] / "adapter_model.safetensors") for name in ("logits", "fused"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
