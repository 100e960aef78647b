"""Prefix / P-tuning / prompt tuning, AdaLoRA, and the LoRA variants (PiSSA, LoRA+,
create_new_adapter) through the real recipes: they train, reload with plain peft, chat,
export (merged or base + adapter, verified), serve as the dpo policy, and their bad input
is one line."""

from __future__ import annotations

import json

import pytest
import torch

import lathe
from tests.conftest import run_cli, write_pref_pairs

pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 5, 9, 14, 3, 7]])


@pytest.fixture()
def args(tiny_model, data_dir, tmp_path) -> dict:
    return {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 64, "max_samples": 16, "per_device_train_batch_size": 8,
            "learning_rate": 3e-2, "max_steps": 8, "logging_steps": 1, "save_steps": 1000,
            "output_dir": str(tmp_path / "run"), "seed": 0}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[:, -ids.shape[1]:]


def _base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


@pytest.mark.parametrize("method,keys", [
    ("prefix", {"num_virtual_tokens": 6, "prefix_projection": True, "encoder_hidden_size": 16}),
    ("ptuning", {"num_virtual_tokens": 6, "encoder_reparameterization_type": "LSTM"}),
    ("prompt", {"num_virtual_tokens": 6, "prompt_tuning_init_text": "You are Lathe Assistant."}),
])
def test_prompt_learning_trains_reloads_chats_and_exports_the_pair(method, keys, args, tiny_model, tmp_path):
    from peft import PeftModel

    result = lathe.train({**args, "finetuning_type": method, **keys})
    losses = result.losses()
    assert losses[-1] < losses[0]
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("base_model.model.") for n in trainable)  # the base is frozen
    expected = _logits(result.model)
    reloaded = PeftModel.from_pretrained(_base(tiny_model), args["output_dir"])
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(_base(tiny_model)), expected, atol=1e-4)

    if method == "ptuning":  # chat through the CLI (peft's per-call warning is kept quiet)
        chat = run_cli("chat", args["output_dir"], "max_new_tokens=4", input="Who are you?\n")
        assert chat.returncode == 0 and "Assistant:" in chat.stdout, chat.stderr[-2000:]
        assert "Position ids" not in chat.stderr
    if method != "prompt":  # the export is method-agnostic: once here (the README exports a prefix run)
        return

    out = tmp_path / "export"
    proc = run_cli("export", args["output_dir"], f"export_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stays an adapter" in proc.stdout
    report = json.loads((out / "export_verification.json").read_text())
    assert report["passed"] and report["max_abs_logit_diff"] <= report["bound"]
    assert report["last_adapter_effect"] > report["bound"]  # the check could tell the pair from the base
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "LOADING.md").is_file()
    # as LOADING.md says: plain transformers + peft, from the export alone
    from transformers import AutoModelForCausalLM

    pair = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")
    torch.testing.assert_close(_logits(pair), expected, rtol=0, atol=1e-5)
    chat = run_cli("chat", str(out), "max_new_tokens=4", input="Who are you?\n")
    assert chat.returncode == 0 and "Assistant:" in chat.stdout, chat.stderr[-2000:]

    merge = run_cli("export", args["output_dir"], f"export_dir={tmp_path / 'merged'}", "export_merge=true")
    assert merge.returncode == 2 and "cannot be merged" in merge.stderr
    assert merge.stderr.count("\n") == 1 and not (tmp_path / "merged").exists()


def test_ptuning_is_a_dpo_policy_and_predicts(args, tmp_path):
    """P-tuning's logits carry its virtual tokens in front: the preference log-probs must line
    up with the labels (else the margins stay noise), and predict generates. The reference is
    the base (the adapter off); fresh virtual tokens already move the policy a little from it."""
    d = write_pref_pairs(tmp_path / "pref")
    dpo = lathe.train({**args, "finetuning_type": "ptuning", "num_virtual_tokens": 4, "stage": "dpo",
                       "dataset": "pairs", "dataset_dir": str(d), "max_steps": 6, "learning_rate": 1e-2})
    margins = [h["rewards/margins"] for h in dpo.log_history if "rewards/margins" in h]
    assert abs(margins[0]) < 0.5 and margins[-1] > margins[0] + 0.1
    accuracies = [h["rewards/accuracies"] for h in dpo.log_history if "rewards/accuracies" in h]
    assert accuracies[-1] == 1.0
    pred = lathe.train({**args, "finetuning_type": "prompt", "num_virtual_tokens": 4, "val_size": 4,
                        "do_predict": True, "predict_with_generate": True, "max_new_tokens": 4,
                        "per_device_eval_batch_size": 4, "output_dir": str(tmp_path / "pred")})
    rows = [json.loads(line) for line in (tmp_path / "pred" / "generated_predictions.jsonl").open()]
    assert len(rows) == 4 and "predict_bleu-4" in pred.metrics


def test_adalora_shrinks_the_rank_budget_to_its_target(args, tmp_path):
    result = lathe.train({**args, "finetuning_type": "adalora", "adalora_init_r": 6, "adalora_target_r": 2,
                          "adalora_tinit": 2, "adalora_tfinal": 4, "max_steps": 16, "learning_rate": 1e-2,
                          "lora_target": "q_proj,v_proj"})
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").open()]
    ranks = [r["adalora_rank"] for r in log if "adalora_rank" in r]
    layers = 2 * 2  # two blocks x (q_proj, v_proj)
    assert ranks[-1] == 2 * layers < 6 * layers  # the budget: target_r per layer on average
    assert max(ranks) > ranks[-1]  # it shrank while training
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["total_step"] == 16 and saved["rank_pattern"]
    assert sum(sum(v) for v in saved["rank_pattern"].values()) == 2 * layers
    proc = run_cli("export", str(tmp_path / "run"), f"export_dir={tmp_path / 'export'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "export" / "export_verification.json").read_text())["passed"]
    assert result.losses()[-1] < result.losses()[0]


def test_pissa_is_saved_as_a_plain_lora_of_the_original_base(args, tiny_model, tmp_path):
    from peft import PeftModel

    result = lathe.train({**args, "pissa_init": True, "pissa_iter": -1, "learning_rate": 5e-3})
    expected = _logits(result.model)  # PiSSA's residual base + its adapter, as trained
    assert (tmp_path / "run" / "pissa_init" / "adapter_config.json").is_file()
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * 8  # the converted adapter holds the start and the update
    reloaded = PeftModel.from_pretrained(_base(tiny_model), args["output_dir"])  # the ORIGINAL base
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-4)
    assert not torch.allclose(_logits(_base(tiny_model)), expected, atol=1e-3)


def test_loraplus_trains_b_faster(args):
    from lathe.config.load import load_config
    from lathe.model.adapters import apply_finetuning
    from lathe.model.load import load_model, load_tokenizer
    from lathe.model.methods.lora import loraplus_optimizer

    cfg = load_config({**args, "loraplus_lr_ratio": 16, "weight_decay": 0.01})
    tok = load_tokenizer(cfg.model, args["model_name_or_path"])
    model = apply_finetuning(load_model(cfg, args["model_name_or_path"], tok), cfg.finetune, cfg.model)
    from transformers import TrainingArguments

    opt = loraplus_optimizer(model, TrainingArguments(output_dir=args["output_dir"], learning_rate=1e-3,
                                                      weight_decay=0.01), cfg.finetune)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in opt.param_groups:
        for p in group["params"]:
            lrs[names[id(p)]] = group["lr"]
    assert {lr for n, lr in lrs.items() if "lora_A" in n} == {1e-3}
    assert {round(lr, 9) for n, lr in lrs.items() if "lora_B" in n} == {0.016}
    assert len(lrs) == sum(p.requires_grad for p in model.parameters())
    result = lathe.train({**args, "loraplus_lr_ratio": 16, "learning_rate": 1e-3})
    assert result.losses()[-1] < result.losses()[0]


def test_create_new_adapter_merges_and_trains_a_fresh_one(args, tiny_model, tmp_path):
    from peft import PeftModel

    lathe.train({**args, "output_dir": str(tmp_path / "first")})
    second = lathe.train({**args, "adapter_name_or_path": str(tmp_path / "first"), "create_new_adapter": True,
                          "lora_rank": 4, "output_dir": str(tmp_path / "second")})
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["r"] == 4  # fresh, not the first
    merged = PeftModel.from_pretrained(_base(tiny_model), tmp_path / "first").merge_and_unload()
    both = PeftModel.from_pretrained(merged, tmp_path / "second")
    torch.testing.assert_close(_logits(both), _logits(second.model), rtol=0, atol=1e-5)
    proc = run_cli("export", str(tmp_path / "second"), f"export_dir={tmp_path / 'export'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 adapter(s)" in proc.stdout  # the first is found from the run's config.yaml
    assert json.loads((tmp_path / "export" / "export_verification.json").read_text())["passed"]


def test_adapter_of_another_method_is_one_line(args, tmp_path):
    lathe.train({**args, "finetuning_type": "prompt", "num_virtual_tokens": 4, "max_steps": 1,
                 "output_dir": str(tmp_path / "prompt")})
    out = tmp_path / "again"
    proc = run_cli("train", *[f"{k}={v}" for k, v in args.items() if k != "output_dir"], f"output_dir={out}",
                   f"adapter_name_or_path={tmp_path / 'prompt'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "holds a prompt adapter" in proc.stderr and "finetuning_type: prompt" in proc.stderr
    assert not out.exists()
    proc = run_cli("train", *[f"{k}={v}" for k, v in args.items() if k != "output_dir"], f"output_dir={out}",
                   f"adapter_name_or_path={tmp_path / 'prompt'},{tmp_path / 'prompt'}", "finetuning_type=prompt")
    assert proc.returncode == 2 and "cannot be merged" in proc.stderr and not out.exists()


@pytest.mark.parametrize("keys,message", [
    ({"num_virtual_tokens": 8}, "num_virtual_tokens applies only to finetuning_type: prefix or ptuning or prompt"),
    ({"pissa_convert": True}, "pissa_convert applies only with pissa_init"),
    ({"pissa_init": True, "pissa_convert": False}, "pissa_convert: false would keep an adapter"),
    ({"pissa_init": True, "stage": "dpo"}, "pissa_init with stage dpo"),
    ({"finetuning_type": "prefix", "packing": True}, "packing: true with finetuning_type: prefix"),
    ({"finetuning_type": "adalora", "adalora_target_r": 16}, "adalora_target_r=16 must be between"),
    ({"finetuning_type": "adalora", "adalora_tinit": 5, "adalora_tfinal": 5}, "leave no steps to reallocate"),
    ({"finetuning_type": "prompt", "stage": "ppo"}, "prompt with stage ppo is not in Lathe yet"),
    ({"create_new_adapter": True}, "create_new_adapter: true needs adapter_name_or_path"),
    ({"finetuning_type": "prefix", "quantization_bit": 4}, "quantization_bit needs finetuning_type: lora"),
])
def test_bad_method_keys_are_one_line(keys, message, args):
    from lathe.config.load import load_config
    from lathe.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config({**args, **keys})


@pytest.mark.parametrize("method", ["prefix", "ia3"])
def test_resume_continues_exactly(method, args, tmp_path):
    """Stopped after checkpoint-3 and resumed, the run ends with the adapter of the run that
    never stopped."""
    import shutil

    from safetensors.torch import load_file

    keys = {"finetuning_type": method, "max_steps": 6, "save_steps": 3, "max_samples": 32,
            **({"num_virtual_tokens": 4} if method == "prefix" else {})}
    lathe.train({**args, **keys, "output_dir": str(tmp_path / "whole")})
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", stopped / "checkpoint-3")
    lathe.train({**args, **keys, "output_dir": str(stopped), "resume_from_checkpoint": True,
                 "overwrite_output_dir": False})
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(stopped / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6)
