"""`lathe train` with stage ppo: the reward goes up, and the run directory is usable.

The setting, built once for the module (in process, ~10 s):
- an SFT model that answers every prompt with "Yes." or "No." about half the time each
  (full fine-tuning of the tiny model), plus a 2-step LoRA SFT adapter on top of it,
  which PPO continues (so the reference is that adapter, kept as "ref");
- a reward model that prefers "Yes.": the SFT model with a scalar head, trained here
  with a pairwise loss on "Yes." against "No." and against random token salad, saved as
  a full reward model with Lathe's marker (independent of the rm recipe).
PPO should then move the policy from about half "Yes." to mostly "Yes.".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import IDENTITY, run_cli, write_yaml

PROMPTS = [r["instruction"] for r in json.loads(IDENTITY.read_text(encoding="utf-8"))[:32]]


def _in_process(args: dict) -> None:
    from lathe.config.load import load_config
    from lathe.recipes import run

    run(load_config(args))


def _train_reward_model(sft_model: Path, out: Path) -> None:
    """A full reward model (score head on the SFT model) that prefers the reply "Yes."."""
    from transformers import AutoTokenizer

    from lathe.model.reward import load_reward_backbone, reward_scores, write_marker

    tok = AutoTokenizer.from_pretrained(sft_model)
    torch.manual_seed(0)
    model = load_reward_backbone(str(sft_model), torch.float32, False, tok)
    end = tok.eos_token_id  # <|im_end|> closes a chatml reply
    yes = tok.encode("Yes.", add_special_tokens=False) + [end]
    no = tok.encode("No.", add_special_tokens=False) + [end]
    g = torch.Generator().manual_seed(0)

    def salad() -> list[int]:
        ids = torch.randint(3, len(tok), (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        return ids + [end] if torch.rand(1, generator=g) < 0.5 else ids

    def batch(pairs: list[tuple[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [_prompt_ids(tok, p) + reply for p, reply in pairs]
        width = max(map(len, seqs))
        return (torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs]),
                torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]))

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        prompts = [PROMPTS[i] for i in torch.randint(0, len(PROMPTS), (16,), generator=g).tolist()]
        worse = [no if i % 2 else salad() for i in range(16)]
        scores = reward_scores(model, *batch([(p, yes) for p in prompts] + list(zip(prompts, worse))))
        loss = -torch.nn.functional.logsigmoid(scores[:16] - scores[16:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gap = reward_scores(model, *batch([(p, yes) for p in PROMPTS])) - reward_scores(
            model, *batch([(p, no) for p in PROMPTS]))
    assert gap.min() > 2.0  # the fixture itself works: "Yes." clearly wins for every prompt
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_marker(str(out), base_model=str(out), finetuning_type="full", merged_adapters=[], template="chatml")


def _prompt_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


@pytest.fixture(scope="module")
def yes_no(tmp_path_factory, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo")
    data = root / "data"
    data.mkdir()
    rows = [{"instruction": p, "input": "", "output": reply} for p in PROMPTS for reply in ("Yes.", "No.")]
    (data / "yn.json").write_text(json.dumps(rows), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"yn": {"file_name": "yn.json"}}), encoding="utf-8")
    base = {"dataset": "yn", "dataset_dir": str(data), "template": "chatml", "cutoff_len": 64,
            "per_device_train_batch_size": 8, "logging_steps": 4, "seed": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and a busy machine stalls them)
    try:
        _in_process({**base, "model_name_or_path": str(tiny_model), "finetuning_type": "full",
                     "learning_rate": 2e-2, "max_steps": 32, "output_dir": str(root / "sft")})
        _in_process({**base, "model_name_or_path": str(root / "sft"), "finetuning_type": "lora",
                     "lora_rank": 4, "learning_rate": 1e-3, "max_steps": 2, "output_dir": str(root / "sft-lora")})
        _train_reward_model(root / "sft", root / "rm")
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "sft": root / "sft", "sft_lora": root / "sft-lora", "rm": root / "rm"}


def _ppo_args(yes_no: dict[str, Path], out: Path, **extra) -> dict:
    return {"stage": "ppo", "model_name_or_path": str(yes_no["sft"]),
            "adapter_name_or_path": str(yes_no["sft_lora"]), "reward_model": str(yes_no["rm"]),
            "dataset": "yn", "dataset_dir": str(yes_no["data"]), "template": "chatml", "cutoff_len": 64,
            "per_device_train_batch_size": 16, "learning_rate": 5e-3, "max_steps": 24,
            "max_new_tokens": 8, "output_dir": str(out), "seed": 0, **extra}


def _ppo(tmp_path: Path, monkeypatch, args: dict):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = run_cli("train", str(write_yaml(tmp_path / "ppo.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _p_yes(model, tok) -> float:
    """Mean probability that the reply starts with the first token of "Yes."."""
    y = tok.encode("Yes.", add_special_tokens=False)[0]
    probs = []
    with torch.no_grad():
        for p in PROMPTS[:16]:
            ids = torch.tensor([_prompt_ids(tok, p)])
            probs.append(torch.softmax(model(input_ids=ids).logits[0, -1], -1)[y].item())
    return sum(probs) / len(probs)


def test_ppo_raises_the_reward_and_saves_a_plain_adapter(tmp_path, monkeypatch, yes_no):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ppo"
    proc = _ppo(tmp_path, monkeypatch, _ppo_args(yes_no, out, plot_loss=True))
    assert "reference: the adapter" in proc.stdout

    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25))
    for r in log:
        for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "clipfrac",
                    "response_length"):
            assert math.isfinite(r[key]), (key, r)
    first = sum(r["reward"] for r in log[:3]) / 3
    last = sum(r["reward"] for r in log[-6:]) / 6
    assert last > first + 1.5, (first, last)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as its reference
    results = json.loads((out / "all_results.json").read_text())
    assert results["reward_last"] > results["reward_first"] and "kl_final" in results

    for name in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors",
                 "tokenizer.json", "config.yaml", "trainer_state.json", "train_results.json",
                 "training_reward.png"):
        assert (out / name).is_file(), name
    assert not (out / "ref").exists()  # the frozen reference adapter is not saved
    head = load_file(out / "value_head.safetensors")
    assert head["v_head.weight"].shape == (1, 32) and head["v_head.weight"].abs().sum() > 0

    tok = AutoTokenizer.from_pretrained(out)
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(yes_no["sft"]), yes_no["sft_lora"])
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(yes_no["sft"]), out)
    before, after = _p_yes(sft.eval(), tok), _p_yes(trained.eval(), tok)
    assert after > 0.7 and after > before + 0.25, (before, after)  # measured: 0.43 -> 0.88


def test_ppo_full_tuning_with_a_fixed_kl_and_evaluation(tmp_path, monkeypatch, yes_no):
    from safetensors.torch import load_file

    out = tmp_path / "ppo-full"
    args = _ppo_args(yes_no, out, finetuning_type="full", learning_rate=1e-4, max_steps=2,
                     ppo_target=None, ppo_init_kl_coef=0.3, ppo_score_norm=True, ppo_whiten_rewards=True,
                     val_size=8, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    del args["adapter_name_or_path"]
    proc = _ppo(tmp_path, monkeypatch, args)
    assert "reference: a frozen copy of" in proc.stdout
    assert "2 steps of 8 prompts" in proc.stdout  # 4 per mini-batch x 2 accumulated
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["kl_coef"] for r in log] == [0.3, 0.3]  # no target: the coefficient stays
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_reward" in results and math.isfinite(results["eval_kl"])
    assert (out / "value_head.safetensors").is_file() and not (out / "adapter_config.json").exists()
    before, after = load_file(yes_no["sft"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _fails(tmp_path: Path, args: dict) -> str:
    proc = run_cli("train", str(write_yaml(tmp_path / "bad.yaml", args)))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(("ConfigError:", "ModelError:")), proc.stderr[-2000:]
    return lines[-1]


def test_ppo_without_a_reward_model_is_refused(tmp_path, yes_no):
    args = _ppo_args(yes_no, tmp_path / "out")
    del args["reward_model"]
    assert "stage ppo needs reward_model" in _fails(tmp_path, args)


@pytest.mark.parametrize("which", ["sft_run", "empty_dir"])
def test_ppo_with_a_reward_model_that_is_not_one(tmp_path, yes_no, which):
    bad = yes_no["sft"] if which == "sft_run" else tmp_path / "empty"
    bad.mkdir(exist_ok=True)
    msg = _fails(tmp_path, _ppo_args(yes_no, tmp_path / "out", reward_model=str(bad)))
    assert str(bad) in msg
    assert ("is not a reward model" in msg) if which == "sft_run" else ("is empty" in msg)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def ppo_single(yes_no, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """LoRA and full ppo in one process at 8 prompts a step: name -> (its keys, its run folder)."""
    root = tmp_path_factory.mktemp("ppo-single")
    lora = _ppo_args(yes_no, root / "lora", per_device_train_batch_size=8, max_steps=3, do_sample=False,
                     ppo_epochs=2, ppo_score_norm=True, ppo_whiten_rewards=True, val_size=8, learning_rate=2e-2)
    full = {**lora, "finetuning_type": "full", "learning_rate": 1e-4, "output_dir": str(root / "full")}
    del full["adapter_name_or_path"]
    runs = {"lora": (lora, root / "lora"), "full": (full, root / "full")}
    for name, (keys, _) in runs.items():
        proc = run_cli("train", str(write_yaml(root / f"{name}.yaml", keys)))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


# engine -> (the deepspeed key, what the summary calls it, the runs compared)
PPO_ENGINES = {"ddp": (None, "(DDP)", ("lora", "full")), "zero2": ("ds_z2", "(DeepSpeed ZeRO-2)", ("lora", "full")),
               "zero3": ("ds_z3", "(DeepSpeed ZeRO-3)", ("lora", "full")),
               "zero3_offload": ("ds_z3_offload", "(DeepSpeed ZeRO-3 (optimizer + param offloaded))", ("full",))}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(PPO_ENGINES))
def test_two_processes_run_ppo_as_one_process_does(engine, ppo_single, tmp_path, yes_no):
    """2 processes at 4 prompts each (over gloo: DDP, DeepSpeed ZeRO-2, ZeRO-3) against 1 process at
    8: with greedy replies the rollouts are the same, so every logged figure and the saved weights
    must agree. The settings make each batch statistic count: score normalisation, reward and
    advantage whitening, the adaptive KL coefficient, 2 PPO epochs, evaluation. Under ZeRO-3 the
    policy, its reference (full tuning) and the reward model are sharded: the replies are generated
    with the policy's weights gathered, and the saved weights are gathered from the shards.
    What differs is float rounding: sums in another order (an all-reduce of two halves, DeepSpeed's
    partitioned reduce), and each process pads its prompts to its own longest, so the matrices have
    other shapes: about 1e-6 relative. The logged figures keep 6 decimals (hence the absolute 3e-6);
    a statistic taken per process instead of over the batch moved them by 1e-2 while this was built.
    Adam divides each gradient by its own running size, which lifts rounding in near-zero gradients
    to a share of a step; so the weights are held to 5e-3 of how far the largest one moved, where
    processes training apart would differ by about as much as they moved."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import REPO

    deepspeed, called, names = PPO_ENGINES[engine]
    configs = []
    for name in names:
        keys = ppo_single[name][0]
        two = {**keys, "per_device_train_batch_size": 4, "output_dir": str(tmp_path / name)}
        if deepspeed:
            two["deepspeed"] = deepspeed
        configs.append(str(write_yaml(tmp_path / f"{name}.yaml", two)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "tests.dist_driver", *configs], capture_output=True, text=True,
                          cwd=REPO, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(f"2 process(es) {called}") == len(names), proc.stdout[-3000:]
    assert "steps of 8 prompts (of 56, 4 per process)" in proc.stdout
    for name in names:
        one, two = ppo_single[name][1], tmp_path / name
        logs = [[json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()] for run in (one, two)]
        assert len(logs[1]) == 3
        for a, b in zip(*logs):
            for key, value in a.items():
                if key not in ("elapsed_s", "train_runtime"):
                    assert b[key] == pytest.approx(value, rel=1e-4, abs=3e-6), (name, a["step"], key)
        assert logs[0][-1]["policy_loss"] != logs[0][0]["policy_loss"]  # it trained
        r1, r2 = (json.loads((run / "eval_results.json").read_text()) for run in (one, two))
        assert r2 == pytest.approx(r1, rel=1e-4, abs=1e-6)
        weights = "adapter_model.safetensors" if name == "lora" else "model.safetensors"
        start = load_file((yes_no["sft_lora"] if name == "lora" else yes_no["sft"]) / weights)
        for file in (weights, "value_head.safetensors"):
            expected, got = load_file(one / file), load_file(two / file)
            assert got.keys() == expected.keys()  # complete: every tensor, gathered from its shards
            assert all(got[k].shape == expected[k].shape for k in expected)
            worst = max((got[k].float() - expected[k].float()).abs().max().item() for k in expected)
            if file == weights:  # measured (DDP): 4e-4 (lora) and 1e-3 (full) of the largest move
                moved = max((expected[k].float() - start[k].float()).abs().max().item() for k in expected)
                assert worst < 5e-3 * moved, (name, worst, moved)
            else:  # the value head starts from a fresh initialisation; measured (DDP): 3e-7
                assert worst < 1e-5, (name, worst)
