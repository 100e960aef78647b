"""Several processes on CPU (gloo): DDP, DeepSpeed ZeRO-2 / ZeRO-3 (with offload), Lathe's own
launcher (nproc_per_node, several "machines"), a rank that dies, and accelerate launch.

The yardstick: each stage trained by 2 processes at batch 4 per process equals the same stage
trained by 1 process at batch 8 (the same global batch, the same examples per step), in its
logged losses and its saved weights. Only float rounding differs: sums in another order (an
all-reduce of two halves, or DeepSpeed's partitioned reduce, against one sum), and padding-free
rows formed from each process's 4 examples instead of all 8 (other matrix shapes). That moves a
float32 loss by about 1e-7 relative per step, so losses are held to 2e-5 relative. Adam divides
each gradient by its own running size, which lifts rounding in near-zero gradients to a share of a
step: the weights are held to 5% of one step (0.05 x learning_rate; measured up to 1.7e-5 at
learning rate 1e-3), while processes that do not share their gradients differ by whole steps, and
a wrong normalisation (loss x2, a per-rank KL) moves the losses by 1e-3 or more (seen while this
was built).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lathe
from tests.conftest import REPO, run_cli, run_main, write_yaml

CORPUS_DIR = REPO / "src" / "lathe" / "demo" / "data"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory, tiny_t5, tiny_bert_exact) -> dict[str, Path]:
    from tests.tiny_encoders import write_ner, write_pairs, write_qa, write_sentiment, write_translation

    d = tmp_path_factory.mktemp("stages")
    prompts = [f"Tell me about {t}, please ({i})." for i in range(4)
               for t in ("the sea", "a tree", "the moon", "bread", "a river", "music", "the city", "a cat")]
    good, bad = "Yes, gladly. It is good.", "No."
    (d / "pairs.json").write_text(json.dumps([{"instruction": p, "input": "", "chosen": good, "rejected": bad}
                                              for p in prompts]))
    (d / "kto.json").write_text(json.dumps([{"instruction": p, "input": "", "output": good if i % 2 else bad,
                                             "kto_tag": bool(i % 2)} for i, p in enumerate(prompts)]))
    (d / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True},
                                                     "kto_rows": {"file_name": "kto.json"}}))
    made = {name: write(tmp_path_factory.mktemp(name)) for name, write in (
        ("sentiment", write_sentiment), ("ner", write_ner), ("translation", write_translation),
        ("qa", write_qa), ("pairs", write_pairs))}
    # no dropout: each process would draw its own masks (the T5 has none)
    return {"pref": d, **made, "bert": tiny_bert_exact, "t5": tiny_t5}


def stages(base: dict, data: dict[str, Path]) -> dict[str, dict]:
    """Every training stage, 4 steps each (the weights file each saves is read back)."""
    lora = {**base, "lora_target": "all"}
    pref = {**lora, "dataset_dir": str(data["pref"]), "dataset": "pairs"}
    # adam_epsilon: these models have weights whose gradient is 0 or about 0 (QA's output bias: a
    # softmax over positions ignores a shift; some of the T5's); splitting the batch flips its sign
    # by rounding alone, and at epsilon 1e-8 Adam's first step turns that into a whole step (the T5 in
    # one process, batch 8 against 4 x 2 accumulated: 0.4 x lr apart; at 1e-6: 1e-7, the same moves)
    task = {**base, "model_name_or_path": str(data["bert"]), "finetuning_type": "full", "learning_rate": 1e-3,
            "adam_epsilon": 1e-6}
    return {
        "sft": lora,
        "sft_full": {**base, "finetuning_type": "full", "learning_rate": 1e-3},
        "pt": {**lora, "stage": "pt", "dataset": "lathe_corpus", "dataset_dir": str(CORPUS_DIR)},
        "dpo": {**pref, "stage": "dpo"},
        "dpo_full": {**pref, "stage": "dpo", "finetuning_type": "full", "learning_rate": 1e-3},
        "kto": {**pref, "stage": "kto", "dataset": "kto_rows"},
        "rm": {**pref, "stage": "rm"},
        "cls": {**lora, "stage": "cls", "dataset": "sentiment", "dataset_dir": str(data["sentiment"])},
        # the task types on the encoders they are made for, full fine-tuning
        "tagging": {**task, "stage": "tagging", "dataset": "ner", "dataset_dir": str(data["ner"])},
        "seq2seq": {**task, "stage": "seq2seq", "model_name_or_path": str(data["t5"]), "dataset": "en_fr",
                    "dataset_dir": str(data["translation"])},
        "qa": {**task, "stage": "qa", "dataset": "qa", "dataset_dir": str(data["qa"]), "cutoff_len": 32,
               "doc_stride": 8},
        # in-batch negatives: every process's, as in one process at the same global batch
        "embed": {**task, "stage": "embed", "dataset": "pairs", "dataset_dir": str(data["pairs"])},
    }


TASKS = ("tagging", "seq2seq", "qa", "embed")

# engine -> (the deepspeed key, the stages run under it): DDP and ZeRO-3 run every stage; ZeRO-2
# and offload (the same code paths with other partitioning) one stage of each kind
ENGINES = {
    "ddp": (None, ["sft", "sft_full", "pt", "dpo", "dpo_full", "kto", "rm", "cls", *TASKS]),
    "zero2": ("ds_z2", ["sft", "dpo_full", "cls", "embed"]),
    "zero3": ("ds_z3", ["sft", "sft_full", "pt", "dpo", "dpo_full", "kto", "rm", "cls", *TASKS]),
    "zero3_offload": ("ds_z3_offload", ["sft_full"]),
}


@pytest.fixture(scope="module")
def single(tiny_model, data_dir, stage_data, tmp_path_factory) -> tuple[dict, dict[str, Path]]:
    """Every stage in one process at batch 8: (the common keys, stage -> its run folder)."""
    root = tmp_path_factory.mktemp("single")
    base = {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 64, "max_samples": 64, "learning_rate": 5e-3,
            "max_steps": 4, "logging_steps": 1, "save_steps": 1000, "seed": 0}
    runs = {}
    for name, keys in stages(base, stage_data).items():
        runs[name] = root / name
        lathe.train({**keys, "per_device_train_batch_size": 8, "output_dir": str(runs[name])})
    return base, runs



FUSED = ("sft", "sft_full", "pt")  # the stages whose loss is fused with the output layer by default


@pytest.fixture(scope="module")
def single_unfused(single, stage_data, tmp_path_factory) -> dict[str, Path]:
    """The fused-loss stages again in one process with the model's own loss: ZeRO-3 shards the output
    layer, so there the model's own loss runs, and the yardstick must compute the same."""
    base, _ = single
    root = tmp_path_factory.mktemp("single-unfused")
    runs = {}
    for name in FUSED:
        runs[name] = root / name
        lathe.train({**stages(base, stage_data)[name], "per_device_train_batch_size": 8, "fused_loss": False,
                     "output_dir": str(runs[name])})
    return runs


def _losses(run: Path) -> list[float]:
    lines = (run / "trainer_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    found = [p for p in ("adapter_model.safetensors", "model.safetensors") if (run / p).is_file()]
    assert found, f"no weights in {run}"
    return load_file(str(run / found[0]))


def test_torchrun_shares_the_data_and_rank_0_writes_once(tmp_path, base_args):
    """The README's `torchrun --nproc_per_node 2 -m lathe train ...` as users type it."""
    args = {**base_args, "max_samples": 64, "max_steps": 4, "logging_steps": 1, "val_size": 16, "plot_loss": True}
    cfg = write_yaml(tmp_path / "cfg.yaml", args)
    proc = run_cli("train", str(cfg), launcher=[*TORCHRUN, "-m", "lathe"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(args["output_dir"])
    records = [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one writer: no duplicated lines
    # 48 training rows, batch 8 per process: with DDP an epoch is 3 steps, not 6
    assert records[-1]["epoch"] > 1.0
    assert proc.stdout.count("Lathe | stage sft") == 1 and "2 process(es) (DDP)" in proc.stdout
    assert (run / "adapter_model.safetensors").is_file() and (run / "training_loss.png").is_file()
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_train_every_stage_as_one_process_does(engine, single, stage_data, tmp_path, request):
    base, runs = single
    deepspeed, names = ENGINES[engine]
    zero3 = engine.startswith("zero3")
    if zero3:
        runs = {**runs, **request.getfixturevalue("single_unfused")}
    configs = []
    for name in names:
        keys = {**stages(base, stage_data)[name], "per_device_train_batch_size": 4,
                "output_dir": str(tmp_path / name)}
        if deepspeed:
            keys["deepspeed"] = deepspeed
        if zero3 and name in FUSED:
            keys["fused_loss"] = False  # as ZeRO-3 would decide anyway (its output layer is sharded)
        configs.append(str(write_yaml(tmp_path / f"{name}.yaml", keys)))
    proc = subprocess.run([*TORCHRUN, "-m", "tests.dist_driver", *configs], capture_output=True, text=True,
                          cwd=REPO, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("2 process(es)") == len(names)  # rank 0 alone prints, once per stage
    for name in names:
        one, two = runs[name], tmp_path / name
        assert _losses(two) == pytest.approx(_losses(one), rel=2e-5), name
        assert len(_losses(two)) == 4, name
        expected, got = _weights(one), _weights(two)
        assert got.keys() == expected.keys(), name  # complete: every tensor, gathered from its shards
        for key, tensor in expected.items():
            assert got[key].shape == tensor.shape, (name, key)
            lr = stages(base, stage_data)[name].get("learning_rate", base["learning_rate"])
            assert (got[key] - tensor).abs().max().item() < 0.05 * lr, (name, key)
    if deepspeed:
        assert "DeepSpeed ZeRO-" in proc.stdout


@pytest.mark.slow
def test_nproc_per_node_starts_the_processes_and_a_zero3_checkpoint_resumes(single, tmp_path):
    """`lathe train cfg nproc_per_node=2`: Lathe runs torchrun itself; the run's config records the
    key (repeating it starts two processes again); a ZeRO-3 run cut after its step-2 checkpoint
    resumes to the weights of the run that was not cut. gradient_checkpointing is unset and
    device_memory too small: the launching process decides once (on), every process trains so,
    and the losses are those of the one-process run without it."""
    base, runs = single
    out = tmp_path / "run"
    keys = {**base, "lora_target": "all", "per_device_train_batch_size": 4, "save_steps": 2,
            "output_dir": str(out), "deepspeed": "ds_z3", "device_memory": 0.2}
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", keys)), "nproc_per_node=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es) (DeepSpeed ZeRO-3)" in proc.stdout
    assert proc.stdout.count("Lathe | stage sft") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout.count("gradient checkpointing on (unset: the plan needs") == 1
    assert "nproc_per_node: 2" in (out / "config.yaml").read_text()
    assert "gradient_checkpointing: true" in (out / "config.yaml").read_text()
    uncut = _weights(out)
    # cut: the last checkpoint and the final weights gone, the log back to step 2
    import shutil

    shutil.rmtree(out / "checkpoint-4")
    for name in ("adapter_model.safetensors", "all_results.json", "train_results.json"):
        (out / name).unlink()
    log = [line for line in (out / "trainer_log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (out / "trainer_log.jsonl").write_text("\n".join(log) + "\n")
    proc = run_cli("train", str(out / "config.yaml"), "resume_from_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checkpoint-2" in proc.stdout
    assert [r["step"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3, 4]
    resumed = _weights(out)
    assert all((resumed[k] - uncut[k]).abs().max().item() < 1e-6 for k in uncut)
    assert _losses(out) == pytest.approx(_losses(runs["sft"]), rel=2e-5)


@pytest.mark.slow
def test_two_machines_joined_by_rendezvous_train_and_save_once(single, tmp_path):
    """Two launches on this machine joined as two "nodes" (NNODES / NODE_RANK / MASTER_ADDR /
    MASTER_PORT, one process each): one run of 2 processes, written once."""
    from tests.servers import free_port

    base, runs = single
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", {**base, "lora_target": "all", "per_device_train_batch_size": 4,
                                             "output_dir": str(out)})
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = {**os.environ, "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "lathe", "train", str(cfg)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "2 process(es) (DDP)" in outs[0][0] and "Lathe | stage" not in outs[1][0]
    steps = [r["step"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one writer
    assert _losses(out) == pytest.approx(_losses(runs["sft"]), rel=2e-5)


def _rank_1_once_training(launcher: subprocess.Popen, out: Path):
    """The process of rank 1 of a `nproc_per_node=2` launch, once the run has logged a step."""
    import psutil

    deadline = time.time() + 300
    log = out / "trainer_log.jsonl"
    while not (log.is_file() and log.read_text().strip()) and time.time() < deadline:
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.5)
    return next(p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("RANK") == "1")


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_run_with_one_line(single, tmp_path):
    """SIGKILL one of two processes mid-run: the launcher stops the other and ends in seconds,
    with one line naming the rank and the signal (not a hang, not torchrun's report)."""

    base, _ = single
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", {**base, "per_device_train_batch_size": 4, "max_steps": 100000,
                                             "output_dir": str(out), "ddp_timeout": 60})
    launcher = subprocess.Popen([sys.executable, "-m", "lathe", "train", str(cfg), "nproc_per_node=2"], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        victim = _rank_1_once_training(launcher, out)
        victim.send_signal(signal.SIGKILL)
        killed = time.time()
        _, err = launcher.communicate(timeout=120)
        took = time.time() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1
    assert took < 60, took
    lines = [line for line in err.splitlines() if "Error:" in line]
    assert len(lines) == 1 and "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    assert lines[0].startswith("LaunchError: rank 1 (pid ") and "killed by SIGKILL" in lines[0]
    # the survivor, if the collective failed before it was stopped, says why in one line of its own
    assert all(line.startswith("rank 0 stopped: another process") for line in err.splitlines()
               if line.strip() and not line.startswith(("LaunchError", "train:", "\r"))
               and "train:" not in line), err[-3000:]


@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_run_after_ddp_timeout(single, tmp_path):
    """SIGSTOP one of two processes mid-run (a hung rank: alive, silent): the other gives up
    after ddp_timeout seconds with one line, and the launcher stops the run (not a hang)."""
    base, _ = single
    cfg = write_yaml(tmp_path / "cfg.yaml", {**base, "per_device_train_batch_size": 4, "max_steps": 100000,
                                             "output_dir": str(tmp_path / "run"), "ddp_timeout": 10})
    launcher = subprocess.Popen([sys.executable, "-m", "lathe", "train", str(cfg), "nproc_per_node=2"], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = None
    try:
        victim = _rank_1_once_training(launcher, tmp_path / "run")
        victim.suspend()
        stopped = time.time()
        _, err = launcher.communicate(timeout=180)
        took = time.time() - stopped
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if victim is not None and victim.is_running():
            victim.kill()
    assert launcher.returncode == 1, err[-3000:]
    assert 10 <= took < 90, took  # ddp_timeout, then the launcher's grace period for the hung process
    assert "rank 0 stopped: another process of the run stopped answering (timed out" in err, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("LaunchError: rank 0 (pid "), err[-3000:]


@pytest.mark.slow
def test_accelerate_launch_starts_the_processes_it_was_asked_for(single, tmp_path):
    """accelerate's CPU launcher starts one process (it leaves more to mpirun): Lathe then starts
    the num_processes it was given; and the shipped ddp.yaml starts them through accelerate."""
    base, runs = single
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    for how, flags in (("cpu", ["--cpu", "--num_processes", "2"]),
                       ("config", ["--config_file", str(REPO / "examples" / "accelerate" / "ddp.yaml")])):
        out = tmp_path / how
        cfg = write_yaml(tmp_path / f"{how}.yaml", {**base, "lora_target": "all", "per_device_train_batch_size": 4,
                                                     "output_dir": str(out)})
        proc = subprocess.run([*accelerate, *flags, "-m", "lathe", "train", str(cfg)], capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 process(es) (DDP)" in proc.stdout, how
        assert _losses(out) == pytest.approx(_losses(runs["sft"]), rel=2e-5), how


@pytest.mark.parametrize(("keys", "says"), [
    ({"deepspeed": "missing.json"}, "deepspeed: missing.json does not exist"),
    ({"deepspeed": "{bad}"}, "is not valid JSON (line 1, column 2"),
    ({"deepspeed": "ds_z3", "fsdp": "full_shard"}, "deepspeed and fsdp are both set"),
    ({"deepspeed": "ds_z3", "quantization_bit": 4}, "cannot run under DeepSpeed ZeRO-3"),
    ({"deepspeed": "ds_z3", "finetuning_type": "freeze"}, "freeze cannot run under DeepSpeed ZeRO-3"),
    ({"nproc_per_node": 4096}, "nproc_per_node=4096 is more than this machine has"),
    ({"nproc_per_node": 0}, "nproc_per_node must be at least 1"),
    ({"fsdp": "full_shard"}, "fsdp needs GPUs"),
])
def test_engine_mistakes_are_one_line_and_write_nothing(keys, says, base_args, tmp_path):
    if keys.get("deepspeed") == "{bad}":
        keys = {**keys, "deepspeed": str(tmp_path / "bad.json")}
        (tmp_path / "bad.json").write_text("{bad}")
    out = tmp_path / "run"
    r = run_main("train", str(write_yaml(tmp_path / "cfg.yaml", {**base_args, **keys, "output_dir": str(out)})))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert not out.exists()


def test_deepspeed_missing_is_one_line(base_args, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    r = run_main("train", str(write_yaml(tmp_path / "cfg.yaml", {**base_args, "deepspeed": "ds_z2"})))
    assert r.returncode == 2 and "pip install 'lathe[deepspeed]'" in r.stderr, r.stderr


def test_the_presets_are_the_names_llamafactory_users_know():
    from lathe.distributed import DEEPSPEED_PRESETS, read_deepspeed

    assert set(DEEPSPEED_PRESETS) == {"ds_z0", "ds_z2", "ds_z2_offload", "ds_z3", "ds_z3_offload"}
    for name, path in DEEPSPEED_PRESETS.items():
        assert (REPO / "examples" / "deepspeed" / path.name).is_file()
        ds = read_deepspeed(name)
        assert ds["zero_optimization"]["stage"] == int(name[4])
        assert ("offload_optimizer" in ds["zero_optimization"]) == name.endswith("offload")
        assert read_deepspeed(f"examples/deepspeed/{path.name}" if Path("examples").is_dir() else path) == ds
