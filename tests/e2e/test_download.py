"""`lathe download` against a hub on localhost (tests/fake_hub.py speaks the Hugging Face hub's
API), and ModelScope ids through the real modelscope client and its cache, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lathe
from tests.conftest import REPO, one_error, run_main
from tests.servers import free_port


@pytest.fixture()
def hub(tiny_model, tmp_path):
    """(endpoint, request log, start(cuts)): a fake hub serving the tiny model as lathe/tiny."""
    procs = []

    def start(cuts: int = 0) -> tuple[str, Path]:
        for p in procs:
            p.terminate()
            p.wait()
        served = tmp_path / "served" / "tiny"
        if not served.exists():
            shutil.copytree(tiny_model, served)
        log = served.parent / "fake_hub.log"
        log.unlink(missing_ok=True)
        port = free_port()
        extra = ["4000", str(cuts)] if cuts else []
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.fake_hub", str(served), "lathe/tiny", str(port),
                                       *extra], cwd=REPO))
        deadline = time.time() + 30
        import socket

        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        return f"http://127.0.0.1:{port}", log

    yield start
    for p in procs:
        p.terminate()
        p.wait()


def _download(endpoint: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = endpoint
    return subprocess.run([sys.executable, "-m", "lathe", "download", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_an_interrupted_download_resumes_and_the_folder_is_a_model(hub, tiny_model, tmp_path):
    endpoint, log = hub(cuts=20)  # every attempt at the weights is cut after 4 kB: the client gives up
    out = tmp_path / "models" / "tiny"
    first = _download(endpoint, "lathe/tiny", "--to", str(out), cwd=tmp_path)
    line = one_error(first)
    assert "the download of lathe/tiny" in line and "run the same command again to resume" in line
    kept = {p.name for p in out.iterdir() if p.is_file()}
    assert {"config.json", "tokenizer.json"} <= kept and "model.safetensors" not in kept

    endpoint, log = hub(cuts=0)  # the network is back
    again = _download(endpoint, "lathe/tiny", "--to", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"set model_name_or_path: {out}" in again.stdout
    fetched = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("GET /lathe/tiny/resolve")]
    assert [f.rsplit("/", 1)[1] for f in fetched] == ["model.safetensors"]  # only what was missing
    for f in tiny_model.iterdir():
        if f.is_file():
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert json.loads((out / ".lathe-download.json").read_text())["complete"] is True
    # the folder is a model with no network: a short run on it
    result = lathe.train({"model_name_or_path": str(out), "dataset": "identity", "template": "chatml",
                          "dataset_dir": str(REPO / "src" / "lathe" / "demo" / "data"), "max_samples": 8,
                          "per_device_train_batch_size": 4, "max_steps": 1, "cutoff_len": 64,
                          "output_dir": str(tmp_path / "run")})
    assert result.metrics["train_loss"] > 0


def test_download_mistakes_are_one_line(hub, tmp_path):
    endpoint, _ = hub()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    line = one_error(_download(endpoint, "lathe/tiny", "--to", str(busy), cwd=tmp_path))
    assert "already holds files" in line and (busy / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in busy.iterdir()) == ["mine.txt"]
    line = one_error(_download(endpoint, "lathe/nothing", "--to", str(tmp_path / "x"), cwd=tmp_path))
    assert "no such model" in line
    r = run_main("download", "lathe/tiny", "--to", str(tmp_path / "offline"))  # HF_HUB_OFFLINE is set here
    assert "cannot download lathe/tiny: HF_HUB_OFFLINE is set" in one_error(r)
    assert not (tmp_path / "offline").exists()


@pytest.fixture()
def modelscope_cache(tiny_model, tmp_path, monkeypatch):
    """A ModelScope cache holding the tiny model as lathe/tiny, as the client lays it out."""
    cache = tmp_path / "modelscope"
    shutil.copytree(tiny_model, cache / "models" / "lathe--tiny" / "snapshots" / "master")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("how", ["prefix", "use_modelscope_hub"])
def test_a_modelscope_id_trains_from_its_cache_offline(how, modelscope_cache, data_dir, tmp_path):
    name = "modelscope:lathe/tiny" if how == "prefix" else "lathe/tiny"
    keys = {"use_modelscope_hub": True} if how == "use_modelscope_hub" else {}
    result = lathe.train({"model_name_or_path": name, **keys, "dataset": "identity", "dataset_dir": str(data_dir),
                          "template": "chatml", "max_samples": 8, "per_device_train_batch_size": 4,
                          "max_steps": 1, "cutoff_len": 64, "output_dir": str(tmp_path / "run")})
    assert result.metrics["train_loss"] > 0
    saved = (tmp_path / "run" / "adapter_config.json").read_text()
    assert str(modelscope_cache) in saved  # the base is the cached copy


def test_modelscope_mistakes_are_one_line(modelscope_cache, base_args, tmp_path, monkeypatch):
    from tests.conftest import write_yaml

    cfg = write_yaml(tmp_path / "cfg.yaml", {**base_args, "model_name_or_path": "modelscope:lathe/absent"})
    line = one_error(run_main("train", str(cfg)))
    assert "cannot load modelscope:lathe/absent: MODELSCOPE_OFFLINE is set, and the ModelScope cache has no copy" \
        in line and "lathe download modelscope:lathe/absent --to DIR" in line
    monkeypatch.setitem(sys.modules, "modelscope", None)  # the package is not installed
    line = one_error(run_main("train", str(write_yaml(tmp_path / "c2.yaml", {
        **base_args, "model_name_or_path": "modelscope:lathe/tiny"}))))
    assert "pip install 'lathe[modelscope]'" in line
    assert not Path(base_args["output_dir"]).exists()
