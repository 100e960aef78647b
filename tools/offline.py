"""Lathe for machines with no network: one folder holding every wheel, and an install from it.

On a machine that can reach PyPI (the same OS, CPU architecture and Python as the closed one,
or name them with --platform / --python-version):

    python tools/offline.py wheelhouse --to dist/wheelhouse --torch "torch==2.13.0" --extras deepspeed,qlora

carry dist/wheelhouse over, then on the closed machine (`make install-offline` runs this):

    python tools/offline.py install --from dist/wheelhouse --venv .venv

The wheelhouse holds torch (the build named in MANIFEST.json), Lathe's own wheel, every
dependency of Lathe and of the extras asked for, and the build tools for the few packages
PyPI ships as source only (built into wheels here when the platform is this one). The install
uses pip with --no-index: nothing is fetched; a wheel that is missing is named in one line
(exit 2). Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "MANIFEST.json"


class OfflineError(Exception):
    """A mistake or a missing wheel: one line, exit 2."""


class MissingWheel(OfflineError):
    """pip found no distribution for a requirement (its name is the message)."""


def pip(python: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        missing = re.search(r"No matching distribution found for ([^\s]+)", proc.stderr)
        if missing:
            raise MissingWheel(missing.group(1))
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "Location" not in line]
        raise OfflineError(f"pip {args[0]} failed: {lines[-1].strip() if lines else 'no message'}")
    return proc


# --- building the wheelhouse (online) ------------------------------------------------------------

def build(to: Path, torch: str, extras: list[str], platform: str | None, python_version: str | None) -> dict:
    to.mkdir(parents=True, exist_ok=True)
    target = []
    if platform or python_version:
        target = ["--only-binary=:all:", "--implementation", "cp"]
        if platform:
            target += ["--platform", platform]
        if python_version:
            target += ["--python-version", python_version]
    here = sys.executable
    try:
        pip(here, "download", "-q", "--no-deps", "-d", str(to), *target, torch)
        pip(here, "wheel", "-q", "--no-deps", "-w", str(to), str(REPO))  # Lathe itself
        spec = f"{REPO}[{','.join(extras)}]" if extras else str(REPO)
        constraints = ["-c", str(REPO / "constraints.txt")]
        if target:  # another platform: binary wheels only, and the source-only packages as they are
            _download_for_platform(to, spec, constraints, target)
        else:  # this platform: sdists (jieba, deepspeed ...) built into wheels here, once
            pip(here, "wheel", "-q", "-w", str(to), *constraints, "--no-build-isolation", spec)
        pip(here, "download", "-q", "-d", str(to), *target, "pip", "setuptools", "wheel")
    except OfflineError as e:
        raise OfflineError(f"cannot build the wheelhouse: {e}") from None
    torch_wheel = next((p.name for p in to.glob("torch-*.whl")), None)
    manifest = {"torch": torch, "torch_wheel": torch_wheel, "extras": extras,
                "lathe": _lathe_version(to), "python": python_version or sysconfig.get_python_version(),
                "platform": platform or sysconfig.get_platform(),
                "files": sorted(p.name for p in to.iterdir() if p.name != MANIFEST)}
    (to / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _download_for_platform(to: Path, spec: str, constraints: list[str], target: list[str]) -> None:
    """Binary wheels for the target; a dependency PyPI ships as source only (jieba, deepspeed) is
    fetched as its source, built when it is installed there (pure Python)."""
    sources: list[str] = []
    for _ in range(20):
        try:
            pip(sys.executable, "download", "-q", "-d", str(to), *constraints, *target,
                *[f"--no-binary={s}" for s in sources], spec)
            return
        except MissingWheel as e:
            name = re.split(r"[<>=!~\[; ]", str(e))[0]
            if name in sources:
                raise
            pip(sys.executable, "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(to), str(e))
            sources.append(name)
    raise OfflineError("too many source-only packages; build the wheelhouse on the target platform itself")


def _lathe_version(to: Path) -> str | None:
    found = sorted(to.glob("lathe-*.whl"))
    return found[-1].name.split("-")[1] if found else None


# --- installing from it (offline) -----------------------------------------------------------------

def install(source: Path, venv_dir: Path, extras: list[str] | None) -> Path:
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        raise OfflineError(f"{source} is not a wheelhouse (no {MANIFEST}); build one with `make wheelhouse` "
                           "on a machine that can reach PyPI")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    absent = [f for f in manifest["files"] if not (source / f).is_file()]
    if absent:
        raise OfflineError(f"the wheelhouse {source} lacks {absent[0]} (its {MANIFEST} lists it); copy the whole "
                           "folder again")
    extras = manifest["extras"] if extras is None else extras
    python = venv_dir / "bin" / "python"
    if not python.is_file():
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    offline = ["--no-index", "--find-links", str(source)]
    spec = f"lathe[{','.join(extras)}]" if extras else "lathe"
    try:  # resolved first, installing nothing: a missing wheel is named before minutes of installing
        pip(python, "install", "-q", "--dry-run", *offline, "--no-build-isolation", f"{spec}=={manifest['lathe']}",
            manifest["torch"])
        pip(python, "install", "-q", *offline, "--upgrade", "pip", "setuptools", "wheel")
        pip(python, "install", "-q", *offline, manifest["torch"])
        pip(python, "install", "-q", *offline, "--no-build-isolation", f"{spec}=={manifest['lathe']}",
            manifest["torch"])
    except MissingWheel as e:
        raise OfflineError(f"the wheelhouse {source} has no wheel for {e} (needed to install lathe there); build "
                           "it again with `make wheelhouse` on a machine that can reach PyPI") from None
    return python


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/offline.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheelhouse", help="collect every wheel into a folder (online)")
    w.add_argument("--to", type=Path, default=REPO / "dist" / "wheelhouse")
    w.add_argument("--torch", default="torch==2.13.0", help="the torch requirement, naming its build")
    w.add_argument("--extras", default="", help="comma-separated: deepspeed,qlora,modelscope,tensorboard")
    w.add_argument("--platform", default=None, help="a pip platform tag (manylinux_2_28_x86_64), if not this one")
    w.add_argument("--python-version", default=None, help="e.g. 3.11, if not this Python")
    i = sub.add_parser("install", help="a venv with lathe from a wheelhouse, with no index (offline)")
    i.add_argument("--from", dest="source", type=Path, default=REPO / "dist" / "wheelhouse")
    i.add_argument("--venv", type=Path, default=REPO / ".venv")
    i.add_argument("--extras", default=None, help="default: the extras the wheelhouse was built with")
    args = p.parse_args(argv)
    extras = [e for e in (args.extras or "").split(",") if e]
    try:
        if args.command == "wheelhouse":
            m = build(args.to, args.torch, extras, args.platform, args.python_version)
            print(f"{len(m['files'])} files in {args.to} (torch: {m['torch_wheel']}; lathe {m['lathe']}; "
                  f"extras: {', '.join(m['extras']) or 'none'}); copy the folder to the closed machine and run "
                  "`make install-offline` there")
        else:
            python = install(args.source, args.venv, extras if args.extras is not None else None)
            print(f"Installed lathe into {args.venv} from {args.source} with no network; {python.parent}/lathe "
                  "doctor checks it")
    except OfflineError as e:
        print(f"OfflineError: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
