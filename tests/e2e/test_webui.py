"""`lathe webui` as a real process, driven in a real browser (Debian's Chromium through
Playwright): fill the train form for the demo model, see a bad value refused next to its field,
preview the data, start a short run, close the browser mid-run and find the run still going,
watch it finish with a loss curve, chat with the result, export it and see the verification,
switch to Chinese. Screenshots of every tab go to test-artifacts/webui/ and are checked to show
something. Without a browser (or Playwright) these skip, saying why.

The checks a page cannot see (a port in use, two runs into one folder, a model or dataset that
does not load, every field's bad value) are made against the same server over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.servers import start_server, stop_server

try:  # the HTTP client the openai package brings (httpx2 in openai 3, httpx before)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts" / "webui"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder like a user's project: the repository's data and benchmarks."""
    work = tmp_path_factory.mktemp("webui")
    for name in ("data", "evaluation"):
        (work / name).symlink_to(REPO / name)
    return work


def start_ui(work: Path, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    return start_server("webui", list(options), "/api/jobs", log, cwd=work)


stop_ui = stop_server


@pytest.fixture(scope="module")
def ui(workspace):
    proc, url = start_ui(workspace, workspace / "webui.log")
    yield url
    stop_ui(proc)
    assert "Traceback" not in (workspace / "webui.log").read_text()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); the browser tests need one")
    home = Path(os.environ.get("LATHE_HOME", "/tmp")) / "chromium-home"  # Chromium writes under $HOME
    home.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
                              env={**os.environ, "HOME": str(home)})
        yield b
        b.close()


def shot(page, name: str) -> Path:
    """A full-page screenshot in test-artifacts/webui, checked to be more than a blank page."""
    from PIL import Image

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    img = Image.open(path).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    assert img.width > 600 and img.height > 300
    assert len(colors) > 50, f"{path} looks blank ({len(colors)} colours)"
    dominant = max(c for c, _ in colors) / (img.width * img.height)
    assert dominant < 0.97, f"{path} is {dominant:.0%} one colour"
    return path


def open_page(browser, url: str, storage: dict | None = None):
    """A new browser window on the UI (`storage`: what a browser kept from before, its local storage)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, storage_state=storage)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/?lang=en")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return context, page, errors


def lathe_chat(work: Path, run: str, message: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lathe", "chat", run, "do_sample=false", "max_new_tokens=64"],
                          input=message + "\n", cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("Assistant: ", 1)[1].rstrip("\n")


def test_train_watch_chat_export_in_a_real_browser(browser, ui, workspace):
    context, page, errors = open_page(browser, ui)
    assert page.locator("#tabs button[data-tab='train']").inner_text() == "Train"
    # the form comes from the schema: defaults and help texts as `lathe keys` prints them
    assert page.locator("#train-lora_rank").input_value() == "8"
    assert "LoRA rank r." in page.locator(".field[data-key='lora_rank'] .help").inner_text()
    page.select_option("#train-finetuning_type", "full")  # LoRA's keys hide for another method
    assert page.locator(".field[data-key='lora_rank']").is_hidden()
    page.select_option("#train-finetuning_type", "lora")
    assert page.locator(".field[data-key='pref_beta']").is_hidden()  # a dpo/kto key under sft

    # a bad value: the CLI's line next to the field, and Start starts nothing
    page.fill("#train-learning_rate", "fast")
    page.wait_for_function("document.querySelector('#train-learning_rate-error').textContent.includes('learning_rate')")
    assert "ConfigError: learning_rate='fast' is not valid" in page.locator("#train-learning_rate-error").inner_text()
    before = httpx.get(ui + "/api/jobs").json()["jobs"]
    page.click("#train-start")
    page.wait_for_function("document.querySelector('#train-note').textContent.length > 12")
    assert httpx.get(ui + "/api/jobs").json()["jobs"] == before
    page.fill("#train-learning_rate", "0.001")

    page.fill("#train-template", "")
    page.click("#suggest-template")  # the demo tokenizer ships a ChatML chat template
    page.wait_for_function("document.querySelector('#train-template').value !== ''")
    assert page.locator("#train-template").input_value() == "chatml"
    # the dataset picker lists dataset_info.json's names; a click adds one
    page.fill("#train-dataset", "")
    page.click("#train-dataset-chips .chip[data-name='identity']")
    assert page.locator("#train-dataset").input_value() == "identity"
    names = json.loads((REPO / "data/dataset_info.json").read_text())
    assert page.locator("#train-dataset-chips .chip").count() == len(names)
    page.fill("#train-max_steps", "60")
    page.fill("#train-val_size", "0.1")
    page.fill("#train-eval_steps", "20")
    page.fill("#train-output_dir", "runs/ui")
    page.wait_for_function("document.querySelector('#train-yaml').textContent.includes('max_steps: 60')")
    yaml_text = page.locator("#train-yaml").inner_text()
    assert "output_dir: runs/ui" in yaml_text and "lora_rank" not in yaml_text  # defaults are left out
    assert page.locator("#train-command").inner_text() == "lathe train train.yaml"

    page.click("#train-preview")
    page.wait_for_selector("#preview-out .example .trained", timeout=60_000)
    assert "I am Lathe" in page.locator("#preview-out .example .trained").first.inner_text()
    assert page.locator("#preview-out .stats tr").count() == 4
    shot(page, "train")

    page.fill("#config-name", "ui-run")
    page.click("#config-save")
    page.wait_for_function("document.querySelector('#train-note').textContent.includes('ui-run.yaml')")

    page.click("#train-start")
    page.wait_for_selector("#tab-runs.active #job-status[data-status='running']", timeout=60_000)
    job = next(j for j in httpx.get(ui + "/api/jobs").json()["jobs"] if j["output"] == "runs/ui")
    assert job["status"] == "running"
    # the run is a process of its own: the browser goes away, the run does not
    kept = context.storage_state()
    context.close()
    context, page, errors2 = open_page(browser, ui, kept)
    errors += errors2
    page.wait_for_selector("#tab-runs.active #job-detail:not([hidden])")  # the page opens on the running run
    assert page.locator("#job-title").inner_text() == "runs/ui"
    assert httpx.get(ui + f"/api/jobs/{job['id']}").json()["status"] in ("running", "done")
    page.wait_for_selector("#job-status[data-status='done']", timeout=300_000)
    page.wait_for_selector("#loss-chart svg polyline.curve-loss")
    points = page.locator("#loss-chart svg polyline.curve-loss").get_attribute("points").split()
    logged = [json.loads(line) for line in (workspace / "runs/ui/trainer_log.jsonl").read_text().splitlines()]
    assert len(points) == sum(1 for h in logged if "loss" in h) >= 5
    evals = page.locator("#loss-chart svg polyline.curve-eval_loss").get_attribute("points").split()
    assert len(evals) == sum(1 for h in logged if "eval_loss" in h) == 3  # steps 20, 40, 60
    assert "Saved lora weights" in page.locator("#job-log").inner_text()
    assert "all_results.json" in page.locator("#job-results").inner_text()
    shot(page, "runs")

    # chat with the result: the same reply `lathe chat` gives (greedy), streamed into the page
    page.click("#tabs button[data-tab='chat']")
    page.fill("#source-chat", "runs/ui")
    page.click("#chat-load")
    page.wait_for_function("document.querySelector('#chat-loaded').textContent.includes('chatml')", timeout=60_000)
    page.fill("#chat-input", "Who are you?")
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
    reply = page.locator(".msg.assistant .text").last.inner_text()
    assert reply and reply == lathe_chat(workspace, "runs/ui", "Who are you?")
    shot(page, "chat")

    # export, and the verification shown in the tab
    page.click("#tabs button[data-tab='export']")
    page.fill("#source-export", "runs/ui")
    page.fill("#export-export_dir", "exports/ui")
    page.click("#export-start")
    page.wait_for_selector("#export-result[data-status='done']", timeout=300_000)
    verification = page.locator("#export-result").inner_text()
    assert '"passed": true' in verification and "export_verification.json" in verification
    assert (workspace / "exports/ui/model.safetensors").is_file()
    shot(page, "export")

    page.click("#tabs button[data-tab='evaluate']")
    page.fill("#source-evaluate", "exports/ui")
    shot(page, "evaluate")
    page.click("#tabs button[data-tab='quantize']")
    page.fill("#source-quantize", "runs/ui")
    shot(page, "quantize")

    # Chinese: every label of the page, and a bad value still gets its line
    page.click("#lang-toggle")
    page.wait_for_function("document.querySelector(\"#tabs button[data-tab='train']\").textContent === '训练'")
    page.click("#tabs button[data-tab='train']")
    assert page.locator("label[for='train-learning_rate']").inner_text().startswith("学习率")
    assert page.locator(".field[data-key='learning_rate'] .help").inner_text() == "学习率峰值。"
    assert page.locator("#train-output_dir").input_value() == "runs/ui"  # the draft survived the reopen and the switch
    page.fill("#train-lora_rank", "-1")
    page.wait_for_function("document.querySelector('#train-lora_rank-error').textContent.includes('lora_rank')")
    shot(page, "train-zh")
    page.reload()  # the language is remembered
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#tabs button[data-tab='runs']").inner_text() == "运行"
    context.close()
    assert errors == []


def _post(url: str, path: str, data: dict) -> dict:
    return httpx.post(url + path, json=data, timeout=120).json()


def test_bad_input_gets_its_line_next_to_the_field_and_starts_nothing(ui, workspace):
    demo = {"model_name_or_path": "lathe:demo", "dataset": "identity", "template": "chatml", "output_dir": "runs/bad"}
    cases = {  # field: (the value, what its line says)
        "learning_rate": ("-", "learning_rate"), "lora_rank": ("0", "lora_rank=0 must be at least 1"),
        "val_size": ("abc", "val_size"), "max_steps": ("1.5", "max_steps"), "cutoff_len": ("0", "cutoff_len"),
        "per_device_train_batch_size": ("0", "per_device_train_batch_size"),
        "template": ("nosuch", "template"), "stage": ("nope", "stage"),
    }
    for key, (value, says) in cases.items():
        r = _post(ui, "/api/check", {"form": "train", "values": {**demo, key: value}})
        assert r["ok"] is False and list(r["errors"]) == [key], (key, r)
        assert says in r["errors"][key] and "\n" not in r["errors"][key]
        r = _post(ui, "/api/jobs", {"form": "train", "values": {**demo, key: value}})
        assert r["ok"] is False and key in r["errors"]
    r = _post(ui, "/api/jobs", {"form": "train", "values": {**demo, "model_name_or_path": "./models/absent"}})
    assert r["errors"] == {"model_name_or_path": "ModelError: model_name_or_path ./models/absent does not exist; "
                                                 "check the path"}
    r = _post(ui, "/api/jobs", {"form": "train", "values": {**demo, "model_name_or_path": "org/absent"}})
    assert list(r["errors"]) == ["model_name_or_path"] and "HF_HUB_OFFLINE" in r["errors"]["model_name_or_path"]
    r = _post(ui, "/api/check", {"form": "train", "values": demo, "extra": "warmup_stepz: 3"})
    assert "_extra" in r["errors"] and "warmup_steps" in r["errors"]["_extra"]  # did you mean

    # a dataset that does not load: the data error, naming the file and row
    data = workspace / "bad-data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"broken": {"file_name": "broken.json"}}))
    (data / "broken.json").write_text(json.dumps([{"instruction": "hi", "output": "ok"}, {"instruction": 3}]))
    r = _post(ui, "/api/jobs", {"form": "train", "values": {**demo, "dataset": "broken", "dataset_dir": str(data)}})
    assert list(r["errors"]) == ["dataset"] and r["errors"]["dataset"].startswith("DataError:")
    assert "broken.json" in r["errors"]["dataset"]
    assert _post(ui, "/api/preview", {"form": "train", "values": {**demo, "dataset": "broken",
                                                                   "dataset_dir": str(data)}})["errors"] == r["errors"]
    # a folder that holds files, and a run still writing into one
    (workspace / "runs/held").mkdir(parents=True)
    (workspace / "runs/held/notes.txt").write_text("mine")
    r = _post(ui, "/api/jobs", {"form": "train", "values": {**demo, "output_dir": "runs/held"}})
    assert list(r["errors"]) == ["output_dir"] and "notes.txt" in r["errors"]["output_dir"]
    assert (workspace / "runs/held/notes.txt").read_text() == "mine"
    long_run = {**demo, "output_dir": "runs/twice", "max_steps": "400"}
    first = _post(ui, "/api/jobs", {"form": "train", "values": long_run})
    assert first["ok"], first
    second = _post(ui, "/api/jobs", {"form": "train", "values": long_run})
    assert list(second["errors"]) == ["output_dir"] and first["job"]["id"] in second["errors"]["output_dir"]
    assert _post(ui, f"/api/jobs/{first['job']['id']}/stop", {})["ok"] is True
    deadline = time.time() + 120
    while httpx.get(ui + f"/api/jobs/{first['job']['id']}").json()["status"] == "running":
        assert time.time() < deadline, "the stopped run is still running"
        time.sleep(0.5)
    assert httpx.get(ui + f"/api/jobs/{first['job']['id']}").json()["status"] == "stopped"
    # the verbs that read a folder: it must exist; their output folder must be new
    r = _post(ui, "/api/jobs", {"form": "export", "source": "runs/none", "values": {"export_dir": "exports/x"}})
    assert list(r["errors"]) == ["_source"] and "runs/none does not exist" in r["errors"]["_source"]
    r = _post(ui, "/api/jobs", {"form": "export", "source": "lathe:demo", "values": {}})
    assert list(r["errors"]) == ["export_dir"]
    r = _post(ui, "/api/jobs", {"form": "quantize", "source": "lathe:demo",
                                "values": {"quantization_scheme": "int8_static", "output_dir": "q/x"}})
    assert r["ok"] is False and "calibration" in json.dumps(r["errors"])


def test_a_port_in_use_and_a_wrong_option_get_one_line(workspace):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "lathe", "webui", f"port={port}"], cwd=workspace,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"ConfigError: port {port} on 127.0.0.1 is in use (another "
                                                "server?); choose another with port=N"]
    proc = subprocess.run([sys.executable, "-m", "lathe", "webui", "lagn=zh"], cwd=workspace,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "did you mean lang" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_runs_survive_a_restart_of_the_ui_then_evaluate_predict_and_quantize(workspace, tmp_path):
    """Jobs are files and processes, not server state: a run started before the UI restarts is
    still running in the new UI (and finishes, with its curve). Then the Evaluate, Predict and
    Quantize tabs' jobs run on it and their results come back."""
    log = tmp_path / "ui.log"
    proc, url = start_ui(workspace, log, "workdir=ui-restart")
    demo = {"model_name_or_path": "lathe:demo", "dataset": "identity", "template": "chatml",
            "output_dir": "runs/restart", "max_steps": "40", "logging_steps": "5"}
    started = _post(url, "/api/jobs", {"form": "train", "values": demo})
    assert started["ok"], started
    stop_ui(proc)
    proc, url = start_ui(workspace, log, "workdir=ui-restart")
    try:
        job = httpx.get(url + f"/api/jobs/{started['job']['id']}").json()
        assert job["status"] in ("running", "done")
        deadline = time.time() + 300
        while job["status"] == "running":
            assert time.time() < deadline
            time.sleep(1)
            job = httpx.get(url + f"/api/jobs/{started['job']['id']}").json()
        assert job["status"] == "done", job["log"]
        assert [p[0] for p in job["curves"]["loss"]] == [5, 10, 15, 20, 25, 30, 35, 40]
        assert "runs/restart" in httpx.get(url + "/api/models").json()["models"]  # offered to the other tabs

        # the other tabs' jobs on the finished run: a benchmark, predictions with scores, int8
        starts = {
            "eval": {"form": "eval", "source": "runs/restart",
                     "values": {"task": "lathe_bench_test", "task_dir": "evaluation", "n_shot": "0",
                                "save_dir": "runs/restart-eval"}},
            "predict": {"form": "predict", "source": "runs/restart",
                        "values": {"eval_dataset": "identity_test", "max_samples": "4", "max_new_tokens": "8",
                                   "do_sample": False, "output_dir": "runs/restart-predict"}},
            "quantize": {"form": "quantize", "source": "runs/restart",
                         "values": {"quantization_scheme": "int8_dynamic", "benchmark_repeats": "0",
                                    "output_dir": "runs/restart-int8"}},
        }
        started = {name: _post(url, "/api/jobs", body) for name, body in starts.items()}
        assert all(r["ok"] for r in started.values()), started
        assert started["predict"]["job"]["command"].startswith("lathe predict runs/restart ")
        results = {}
        for name, r in started.items():
            deadline = time.time() + 600
            while (job := httpx.get(url + f"/api/jobs/{r['job']['id']}").json())["status"] == "running":
                assert time.time() < deadline
                time.sleep(1)
            assert job["status"] == "done", job["log"]
            results[name] = job["results"]
        assert 0 <= results["eval"]["results.json"]["average"]["accuracy"] <= 1
        assert any("bleu" in k for k in results["predict"]["predict_results.json"]), results["predict"]
        report = results["quantize"]["quantize_report.json"]
        assert [m["model"].split(" ")[0] for m in report["models"]] == ["float32", "int8_dynamic"]
    finally:
        stop_ui(proc)
