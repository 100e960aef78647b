"""Models from a hub into a folder: ModelScope ids (`modelscope:org/name`, or
`use_modelscope_hub: true`) resolved through the real modelscope client and its cache, and
`lathe download ID --to DIR` for either hub, so a closed machine can be given the folder.

Both clients resume a partial download on their own (the bytes already in DIR are kept and
the rest is asked for with a Range request); what is added here: the reachability probe
first (one line at once offline, instead of a minute of retries), a marker that makes DIR
recognisably ours while it fills (a folder holding anything else is never written into), and
a check of the weights once it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lathe.errors import ModelError, OutputError
from lathe.integrity import weights_problem

MODELSCOPE = "modelscope:"
MARKER = ".lathe-download.json"


def is_modelscope(name: str) -> bool:
    return name.startswith(MODELSCOPE)


def modelscope_domain() -> str:
    return os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn").removeprefix("https://").rstrip("/")


def modelscope_offline() -> str | None:
    """Why ModelScope must not be asked (None: it can be)."""
    from lathe import hub

    for var in ("MODELSCOPE_OFFLINE", "HF_HUB_OFFLINE"):
        if hub.flag_set(var):
            return f"{var} is set"
    if not hub.host_reachable(modelscope_domain(), 443):
        return f"no network: {modelscope_domain()} cannot be reached (checked in {hub.PROBE_SECONDS:.0f} s)"
    return None


def _client() -> Any:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelError("ModelScope models need the modelscope package: pip install 'lathe[modelscope]' "
                         "(or download the model elsewhere and give its folder)") from None
    return snapshot_download


def modelscope_model(name: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """`modelscope:org/name` -> a local folder: downloaded into the ModelScope cache (resumed if
    cut), or, without the network, the copy already in that cache; else one line."""
    model_id = name.removeprefix(MODELSCOPE)
    snapshot_download = _client()
    why = modelscope_offline()
    cache_dir = cache_dir or os.environ.get("MODELSCOPE_CACHE")  # read now: the client reads it once, at import
    try:
        if why:
            path = snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        else:
            path = snapshot_download(model_id, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # the client's own errors: not found, refused, cut
        if why:
            raise ModelError(f"cannot load {name}: {why}, and the ModelScope cache has no copy; run `lathe "
                             f"download {name} --to DIR` where you are online, then set model_name_or_path to "
                             "DIR") from None
        raise ModelError(f"cannot load {name} from ModelScope: {_reason(e)}; check the id on "
                         f"https://{modelscope_domain()}/models") from None
    if not (Path(path) / "config.json").is_file():
        raise ModelError(f"{name}: the ModelScope copy at {path} has no config.json; it is not a model folder")
    return str(path)


def _reason(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if any(s in text for s in ("404", "not exist", "Not Found", "not found")):
        return "no such model (404)"
    return f"{type(e).__name__}: {text[:160]}"


# --- lathe download ------------------------------------------------------------------------------

def download(name: str, to: str, revision: str | None = None) -> Path:
    """`lathe download ID --to DIR`: the model `name` (a Hugging Face id, or modelscope:org/name)
    into DIR, resuming what an interrupted run left there; checked when complete."""
    out = Path(to).expanduser()
    source = "modelscope" if is_modelscope(name) else "huggingface"
    model_id = name.removeprefix(MODELSCOPE)
    _check_target(out, name)
    if source == "modelscope":
        snapshot_download = _client()
        why = modelscope_offline()
    else:
        from huggingface_hub import snapshot_download

        from lathe import hub

        why = hub.why_offline() if hub.offline() else None
    if why:
        raise ModelError(f"cannot download {name}: {why}; run this where the "
                         f"{'ModelScope' if source == 'modelscope' else 'Hugging Face'} hub can be reached")
    new = not out.exists()
    try:  # (the marker is written after: the clients take a folder with files in it for a finished copy)
        if source == "modelscope":
            snapshot_download(model_id, revision=revision, local_dir=str(out))
        else:
            snapshot_download(repo_id=model_id, revision=revision, local_dir=str(out))
    except BaseException as e:
        reason = _reason(e) if isinstance(e, Exception) else "interrupted"
        if "404" in reason or "RepositoryNotFound" in reason:
            if new:
                shutil.rmtree(out, ignore_errors=True)  # nothing of it was downloaded
            raise ModelError(f"cannot download {name}: no such model on the "
                             f"{'ModelScope' if source == 'modelscope' else 'Hugging Face'} hub ({reason})") from None
        if out.is_dir():
            _write_marker(out, name, revision, complete=False)
        if not isinstance(e, Exception):
            raise
        raise ModelError(f"the download of {name} into {out} stopped ({reason}); run the same command again to "
                         "resume it (the files already there are kept)") from None
    problem = weights_problem(out) if (out / "config.json").is_file() else f"{out} has no config.json"
    if problem:
        raise ModelError(f"{name} was downloaded into {out} but is not a complete model: {problem}")
    _write_marker(out, name, revision, complete=True)
    return out


def _check_target(out: Path, name: str) -> None:
    """DIR must be new, empty, or an earlier download of the same model (resumed)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--to {out} is a file; give a folder")
    marker = out / MARKER
    if marker.is_file():
        try:
            before = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            before = {}
        if before.get("model") != name:
            raise OutputError(f"--to {out} holds a download of {before.get('model', 'another model')}; "
                              "give another folder")
    elif out.is_dir() and any(out.iterdir()):
        raise OutputError(f"--to {out} already holds files that are not a download of {name}; give a new or "
                          "empty folder (nothing there was touched)")


def _write_marker(out: Path, name: str, revision: str | None, complete: bool) -> None:
    tmp = out / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"model": name, "revision": revision, "complete": complete}) + "\n",
                   encoding="utf-8")
    os.replace(tmp, out / MARKER)
