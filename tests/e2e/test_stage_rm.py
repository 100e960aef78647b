"""Stage rm: a reward model learns an easy preference, saves, and reloads to the same scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import logged, run_cli, write_yaml

TOPICS = ("the weather", "a recipe", "my homework", "a poem", "the news", "a book", "music", "travel")
FILLER = ("sure", "maybe", "today", "really", "quite", "simple", "answer", "here", "well", "so")


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory, data_dir) -> Path:
    """48 pairs whose chosen reply always holds 'banana' and whose rejected reply never does
    (otherwise the same words), plus the sft identity set (not preference data)."""
    rng = random.Random(0)
    rows = []
    for i in range(48):
        a = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6)))
        b = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6)))
        rows.append({"instruction": f"Tell me about {TOPICS[i % len(TOPICS)]}, please ({i}).",
                     "input": "", "chosen": f"{a} banana {b}", "rejected": f"{b} {a}"})
    d = tmp_path_factory.mktemp("pref")
    (d / "pref.json").write_text(json.dumps(rows), encoding="utf-8")
    (d / "identity.json").write_text((data_dir / "identity.json").read_text(), encoding="utf-8")
    info = {"pref": {"file_name": "pref.json", "ranking": True}, "identity": {"file_name": "identity.json"}}
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


@pytest.fixture()
def rm_args(tiny_model, pref_dir, tmp_path) -> dict:
    return {
        "stage": "rm", "model_name_or_path": str(tiny_model), "dataset": "pref",
        "dataset_dir": str(pref_dir), "template": "chatml", "cutoff_len": 64, "val_size": 8,
        "per_device_train_batch_size": 8, "max_steps": 12, "learning_rate": 1e-2,
        "logging_steps": 4, "save_steps": 1000, "output_dir": str(tmp_path / "rm"), "seed": 0,
    }


@pytest.fixture(scope="module")
def sft_run(tiny_model, data_dir, tmp_path_factory) -> Path:
    """A finished 2-step sft LoRA run (to build a reward model on, and to be refused as one)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    args = {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 64, "max_samples": 16, "per_device_train_batch_size": 8,
            "learning_rate": 5e-2, "max_steps": 2, "save_steps": 1000, "output_dir": str(out), "seed": 0}
    proc = run_cli("train", str(write_yaml(out.parent / "sft.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _tokenizer(path):
    from transformers import AutoTokenizer

    from lathe.model.load import fix_pad_token

    tok = AutoTokenizer.from_pretrained(path)
    fix_pad_token(tok)
    return tok


def _train_pairs(run: Path, tokenizer) -> dict:
    """The run's own training pairs (the data layer's cache), as one padded batch."""
    from lathe.config import load_config
    from lathe.data.collators import PairwiseCollator
    from lathe.data.loader import load_stage_data
    from lathe.data.templates import get_template

    cfg = load_config(str(run / "config.yaml"))
    data = load_stage_data("rm", cfg.data, tokenizer, get_template(cfg.data.template), seed=cfg.train.seed)
    return PairwiseCollator(tokenizer.pad_token_id)(list(data.train))


def _scores(model, batch) -> torch.Tensor:
    from lathe.model.reward import reward_scores

    with torch.no_grad():
        return reward_scores(model, batch["input_ids"], batch["attention_mask"])


def test_rm_lora_learns_the_preference_and_reloads(tmp_path, rm_args, tiny_model):
    from lathe.model.reward import load_reward_model, read_marker
    from lathe.recipes.rm import pair_metrics

    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", rm_args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(rm_args["output_dir"])
    results = json.loads((run / "all_results.json").read_text())
    assert results["train_pair_accuracy"] > 0.9 and results["train_margin"] > 0
    assert 0 <= results["eval_pair_accuracy"] <= 1 and "eval_margin" in results
    assert "eval_perplexity" not in results  # not a language-model loss
    # a SEQ_CLS adapter that carries the new head, and the marker
    adapter = load_file(run / "adapter_model.safetensors")
    assert any(k.endswith("score.weight") for k in adapter), sorted(adapter)
    assert json.loads((run / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    marker = read_marker(str(run))
    assert marker["finetuning_type"] == "lora" and marker["base_model"] == str(tiny_model.resolve())
    assert "LOAD REPORT" not in proc.stdout + proc.stderr  # the expected missing head is not noise
    assert "pair_accuracy" in proc.stdout and "perplexity" not in proc.stdout
    # the reloaded model scores the training pairs exactly as the trained one did
    tokenizer = _tokenizer(run)
    batch = _train_pairs(run, tokenizer)
    scores = _scores(load_reward_model(str(run), torch.float32, tokenizer), batch)
    half = len(scores) // 2
    again = pair_metrics(scores[:half], scores[half:])
    assert again["pair_accuracy"] == results["train_pair_accuracy"]
    assert again["margin"] == pytest.approx(results["train_margin"], abs=1e-4)


def test_rm_on_an_sft_adapter_reloads_to_identical_scores(tmp_path, rm_args, sft_run, tiny_model):
    """The sft adapter is merged into the backbone, a fresh LoRA + head train on top; the run
    directory rebuilds that exact model (within 1e-5), and the merge matters."""
    from peft import PeftModel

    import lathe
    from lathe.model.reward import load_reward_backbone, load_reward_model, read_marker

    result = lathe.train({**rm_args, "adapter_name_or_path": str(sft_run), "max_steps": 6})
    run = Path(result.output_dir)
    assert read_marker(str(run))["merged_adapters"] == [str(sft_run.resolve())]
    tokenizer = _tokenizer(run)
    batch = _train_pairs(run, tokenizer)
    trained = _scores(result.model.eval(), batch)
    reloaded = _scores(load_reward_model(str(run), torch.float32, tokenizer), batch)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
    # without the sft adapter merged in, the same rm adapter scores differently
    torch.manual_seed(0)
    bare = load_reward_backbone(str(tiny_model), torch.float32, False, tokenizer)
    unmerged = _scores(PeftModel.from_pretrained(bare, str(run)).merge_and_unload().eval(), batch)
    assert (unmerged - trained).abs().max() > 1e-3


def test_rm_freeze_trains_the_head_and_saves_a_full_reward_model(tmp_path, rm_args, tiny_model):
    import lathe
    from lathe.model.reward import load_reward_model

    result = lathe.train({**rm_args, "finetuning_type": "freeze", "freeze_trainable_layers": 1,
                          "max_steps": 6, "val_size": 0})
    run = Path(result.output_dir)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and not any(n.startswith("model.layers.0.") for n in trainable)
    saved, base = load_file(run / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(saved["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    tokenizer = _tokenizer(run)
    batch = _train_pairs(run, tokenizer)
    reloaded = _scores(load_reward_model(str(run), torch.float32, tokenizer), batch)
    torch.testing.assert_close(reloaded, _scores(result.model.eval(), batch), rtol=0, atol=1e-5)


def test_rm_refuses_instruction_data_in_one_line(tmp_path, rm_args):
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", {**rm_args, "dataset": "identity"})))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.count("\n") == 0, err
    assert "'identity' is not preference data" in err and "stages rm/dpo want preference pairs" in err


def test_an_sft_run_is_not_a_reward_model(sft_run, tiny_model):
    from lathe.errors import ModelError
    from lathe.model.reward import load_reward_model

    with pytest.raises(ModelError) as err:
        load_reward_model(str(sft_run), torch.float32, _tokenizer(tiny_model))
    assert "is not a reward model" in str(err.value) and "stage: rm" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("keys", [{}, {"finetuning_type": "full", "learning_rate": 1e-3}], ids=["lora", "full"])
def test_padding_free_pairs_train_the_reward_model_as_padded_pairs_do(tmp_path, rm_args, keys):
    """The same 6 steps on padded pairs and on padding-free pairs (the default: each side's
    sequences side by side, each scored at its own last token): the same logged losses, eval
    loss and pair accuracy, and the same saved weights; the summary says what was saved."""
    runs = {}
    for name, extra in (("padded", {"padding_free": False}), ("free", {})):
        out = tmp_path / name
        cfg = write_yaml(tmp_path / f"{name}.yaml", {**rm_args, **keys, **extra, "max_steps": 6, "logging_steps": 1,
                                                    "output_dir": str(out)})
        proc = run_cli("train", str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (out, proc.stdout)
    (padded, _), (free, said) = runs["padded"], runs["free"]
    assert "padding-free batches: each side's replies in one row (varlen attention); padding" in said

    for key in ("loss", "eval_loss", "eval_pair_accuracy"):
        assert logged(free, key) and logged(free, key) == pytest.approx(logged(padded, key), rel=1e-5, abs=1e-6), key
    name = "model.safetensors" if keys else "adapter_model.safetensors"
    a, b = load_file(padded / name), load_file(free / name)
    # Adam divides each gradient by its running size, lifting float32 rounding in near-zero
    # gradients to a share of a step: held to 0.5% of one (measured 0.15% for LoRA at lr 1e-2)
    lr = {**rm_args, **keys}["learning_rate"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-3 * lr
