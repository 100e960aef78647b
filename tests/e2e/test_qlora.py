"""QLoRA: a 4-bit (or 8-bit) bitsandbytes base with a LoRA on top, on the CPU.

The tiny model's layer sizes (32, 64) are multiples of 32, which bitsandbytes' 4-bit
blocks need. Training must lower the loss and change only the adapter; the run directory
must reload on a quantized base with plain peft to the same logits; chat reads the run at
4 bits; export merges the adapter into the full-precision base and verifies it; dpo's
reference is the quantized base with the adapter off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lathe
from tests.conftest import run_cli, write_pref_pairs

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_64) -> Path:
    """4-bit bases here: the width-64 tiny model (see conftest.tiny_model_64)."""
    return tiny_model_64


@pytest.fixture()
def args(tiny_model, data_dir, tmp_path) -> dict:
    return {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 64, "max_samples": 16, "per_device_train_batch_size": 8,
            "learning_rate": 1e-2, "max_steps": 8, "logging_steps": 1, "save_steps": 1000,
            "output_dir": str(tmp_path / "run"), "seed": 0, "quantization_bit": 4}


def _quantized_base(tiny_model: Path, bits: int = 4):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=q, dtype=torch.float32)


def test_qlora_4bit_trains_and_reloads_with_plain_peft(args, tiny_model, tmp_path):
    from peft import PeftModel

    result = lathe.train(args)
    losses = result.losses()
    assert all(x == x for x in losses) and losses[-1] < losses[0]  # finite and falling
    model = result.model
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(_quantized_base(tiny_model), args["output_dir"]).eval()
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-4)

    # chat reads the run at 4 bits, the adapter kept apart
    proc = run_cli("chat", args["output_dir"], "quantization_bit=4", "max_new_tokens=8",
                   input="Who are you?\n/exit\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Assistant:")
    # export merges into the full-precision base and verifies that
    out = tmp_path / "export"
    proc = run_cli("export", args["output_dir"], f"export_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "export_verification.json").read_text())
    assert report["passed"]
    # and against the 4-bit base + adapter it was trained as, within what 4 bits move the logits
    q = report["quantized_base"]
    assert q["bits"] == 4 and 0 < q["quantization_effect"] and q["max_abs_logit_diff"] <= q["bound"]
    assert "against the 4-bit base" in proc.stdout
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_qlora_8bit_and_dpo_on_a_4bit_base(args, tmp_path):
    result = lathe.train({**args, "quantization_bit": 8, "max_steps": 4})
    assert all(x == x for x in result.losses())
    d = write_pref_pairs(tmp_path / "pref")
    dpo = lathe.train({**args, "stage": "dpo", "dataset": "pairs", "dataset_dir": str(d), "max_steps": 3,
                       "output_dir": str(tmp_path / "dpo")})
    margins = [h["rewards/margins"] for h in dpo.log_history if "rewards/margins" in h]
    assert margins and margins[0] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy at step 0
    assert dpo.metrics["train_loss"] > 0


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_reward_model_and_ppo_on_quantized_or_ia3(method, args, tmp_path):
    """rm trains a scalar head with the adapter (QLoRA: on the 4-bit backbone; IA3: scales);
    its run directory serves as ppo's reward model, and ppo trains the same kind of policy."""
    from peft import PeftModel

    keys = {"quantization_bit": 4} if method == "lora" else {"quantization_bit": None, "finetuning_type": "ia3",
                                                             "learning_rate": 5e-2}
    d = write_pref_pairs(tmp_path / "pref")
    rm = lathe.train({**args, **keys, "stage": "rm", "dataset": "pairs", "dataset_dir": str(d), "max_steps": 6,
                      "output_dir": str(tmp_path / "rm")})
    assert rm.losses()[-1] < rm.losses()[0]
    saved = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["peft_type"] == ("LORA" if method == "lora" else "IA3")
    assert "score" in (saved.get("modules_to_save") or [])  # the head is saved beside the adapter
    from transformers import AutoTokenizer

    from lathe.model.reward import load_reward_model, reward_scores

    tok = AutoTokenizer.from_pretrained(args["model_name_or_path"])
    reward = load_reward_model(str(tmp_path / "rm"), torch.float32, tok)
    assert not isinstance(reward, PeftModel)  # merged for scoring
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    assert torch.isfinite(reward_scores(reward, ids, torch.ones_like(ids))).all()

    ppo = lathe.train({**args, **keys, "stage": "ppo", "reward_model": str(tmp_path / "rm"), "max_steps": 2,
                       "per_device_train_batch_size": 4, "max_new_tokens": 4, "ppo_epochs": 1,
                       "output_dir": str(tmp_path / "ppo")})
    rewards = [h["reward"] for h in ppo.log_history if "reward" in h]
    assert len(rewards) == 2 and all(r == r for r in rewards)
    assert json.loads((tmp_path / "ppo" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_qlora_refusals(args, tmp_path):
    from lathe.config.load import load_config
    from lathe.errors import ConfigError

    with pytest.raises(ConfigError, match="needs finetuning_type: lora"):
        load_config({**args, "finetuning_type": "full"})
    with pytest.raises(ConfigError, match="quantization_bit: 3 is not a width"):
        load_config({**args, "quantization_bit": 3})
    with pytest.raises(ConfigError, match="quantization_type applies to 4-bit only"):
        load_config({**args, "quantization_bit": 8, "quantization_type": "fp4"})
    with pytest.raises(ConfigError, match="only with quantization_bit"):
        load_config({**args, "quantization_bit": None, "quantization_type": "fp4"})
    with pytest.raises(ConfigError, match="lathe export merges"):
        load_config({"model_name_or_path": args["model_name_or_path"], "export_dir": str(tmp_path / "e"),
                     "quantization_bit": 4}, command="export")


def test_missing_bitsandbytes_says_how_to_install(args, monkeypatch):
    import importlib.util

    from lathe.config.load import load_config
    from lathe.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        load_config(args)
