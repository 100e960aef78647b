"""The web UI's server: the page, and a small JSON API the page calls.

Everything long runs as a job (`lathe <verb> config.yaml` in a process of its own, see jobs.py);
the server itself only checks forms, previews data, lists jobs and chats (through the inference
engine `lathe chat` and `lathe api` use).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from fastapi import Request  # the routes' annotations are resolved at module level

from lathe.config.load import build_config
from lathe.errors import LatheError
from lathe.webui import form as forms
from lathe.webui import i18n
from lathe.webui.jobs import Jobs

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("lathe.webui")

# The forms that start a job (`lathe <form> ...`) and the key naming the folder each writes.
OUT_KEY = {"train": "output_dir", "eval": "save_dir", "predict": "output_dir", "export": "export_dir",
           "quantize": "output_dir"}


def _override(key: str, value: Any) -> str:
    return f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"


class ChatModel:
    """The one model the chat tab has loaded (loading another replaces it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: str | None = None
        self.generator: Any = None
        self.notes: list[str] = []

    def load(self, source: str, keys: dict[str, Any]) -> Any:
        from lathe.infer.load import load_generator

        key = json.dumps([source, keys], sort_keys=True, default=str)
        with self.lock:
            if key != self.key:
                self.generator = self.key = None
                notes: list[str] = []
                self.generator = load_generator(build_config(keys, command="chat"), notes.append)
                self.key, self.notes = key, notes
            return self.generator


def create_app(workdir: Path, lang: str = "en") -> Any:
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="Lathe web UI", docs_url=None, redoc_url=None, openapi_url=None)
    jobs = Jobs(workdir)
    chat = ChatModel()
    cwd = os.getcwd()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def fail(errors: dict[str, str], status: int = 400) -> Any:
        return JSONResponse({"ok": False, "errors": errors}, status_code=status)

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            data = None
        return data if isinstance(data, dict) else {}

    def page_keys(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The form's name and the flat config keys of what it holds; for the forms that read a
        picked folder (a run, an export) the keys that load it come first."""
        name = data.get("form")
        if name not in forms.FORMS:
            raise forms.FormErrors({"_form": f"unknown form {name!r}"})
        keys = forms.to_keys(name, data.get("values") or {}, data.get("extra") or "")
        source = str(data.get("source") or "").strip()
        if name in ("eval", "export", "chat"):
            keys = {**folder_keys(source), **keys}
        elif name == "quantize":
            check_source(source)
            keys = {"model_name_or_path": source, **keys}
        elif name == "predict":
            check_source(source)
        return name, keys

    def check_source(source: str) -> None:
        if not source:
            raise forms.FormErrors({"_source": "pick a run directory, an export or a model folder first"})
        if not source.startswith("lathe:") and not os.path.exists(source):
            raise forms.FormErrors({"_source": f"{source} does not exist; pick a finished run or an export"})

    def folder_keys(source: str) -> dict[str, Any]:
        from lathe.runs import model_keys

        check_source(source)
        if not os.path.isdir(source):
            return {"model_name_or_path": source}
        try:
            return model_keys(source)
        except LatheError as e:
            raise forms.FormErrors({"_source": str(e)}) from None

    def resolve(name: str, keys: dict[str, Any], source: str) -> tuple[Any, list[str], str | None]:
        """The checked config `lathe <verb>` builds from the form, the arguments after the verb
        (config.yaml stands for the job's saved config) and the folder it writes."""
        from lathe.api import predict_config, quantize_config

        try:
            if name == "predict":
                cfg = predict_config(source, keys)
                out = cfg.train.output_dir
                return cfg, [source, *(_override(k, v) for k, v in {**keys, "output_dir": out}.items())], out
            if name == "quantize":
                cfg = quantize_config(None, keys)
                return cfg, ["config.yaml"], cfg.train.output_dir
        except LatheError as e:
            raise forms.FormErrors({forms.error_field(e, name, keys): str(e)}) from None
        cfg = forms.check(name, keys)
        out = {"train": cfg.train.output_dir, "eval": cfg.bench.save_dir, "export": cfg.export.export_dir}.get(name)
        return cfg, ["config.yaml"], out

    def preflight(name: str, keys: dict[str, Any], source: str) -> tuple[list[str], str | None]:
        """Every check `lathe <verb>` makes before it writes anything, each on its field."""
        cfg, argv, out = resolve(name, keys, source)
        try:
            if name == "train":
                from lathe.data.loader import load_conversations, stage_kind
                from lathe.model.load import resolve_model_path
                from lathe.recipes.common import check_output_dir

                resolve_model_path(cfg.model.model_name_or_path)
                if not cfg.data.streaming:
                    load_conversations(cfg.data, stage_kind(cfg.finetune.stage))
                check_output_dir(cfg)
            else:
                from lathe.files import check_free_folder

                out_key = OUT_KEY[name]
                if not out:
                    raise forms.FormErrors({out_key: f"{out_key} is missing; name a new or empty folder"})
                check_free_folder(Path(out), out_key)
                if name in ("eval", "export"):
                    from lathe.runs import check_inputs

                    check_inputs(cfg)
        except LatheError as e:
            raise forms.FormErrors({forms.error_field(e, name, keys): str(e)}) from None
        return argv, out

    @app.get("/")
    async def index() -> Any:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/meta")
    async def meta(lang: str = lang) -> Any:
        if lang not in i18n.LANGS:
            return fail({"_form": f"lang {lang} is not one of {', '.join(i18n.LANGS)}"})
        return {"lang": lang, "words": i18n.words(lang),
                "forms": {name: forms.form_spec(name, lang) for name in forms.FORMS}}

    @app.post("/api/check")
    async def check(request: Request) -> Any:
        """Check a form the way `lathe <verb>` checks its config (keys and values; the data and the
        model are read only when it starts), and show the YAML and the command."""
        data = await body(request)
        source = str(data.get("source") or "").strip()
        try:
            name, keys = page_keys(data)
            if name in OUT_KEY:
                _, argv, _ = await run_in_threadpool(resolve, name, keys, source)
            else:
                forms.check(name, keys)
                argv = []
        except forms.FormErrors as e:
            return fail(e.errors)
        verb = name if name in OUT_KEY else "chat"
        shown = " ".join(["lathe", verb, *[a if a != "config.yaml" else f"{verb}.yaml" for a in argv]])
        return {"ok": True, "yaml": forms.config_yaml(keys), "command": shown}

    @app.post("/api/template")
    async def template(request: Request) -> Any:
        """The template a model's tokenizer suggests (its own chat template, or a known one)."""
        data = await body(request)
        model = str(data.get("model") or "").strip()

        def suggest() -> str:
            from lathe.data.templates import suggest_template
            from lathe.model.load import load_tokenizer, resolve_model_path
            from lathe.runs import read_run_config

            recorded = read_run_config(model).get("template") if os.path.isdir(model) else None
            if recorded:
                return str(recorded)
            if not model:
                raise forms.FormErrors({"model_name_or_path": "model_name_or_path is missing; pick a model first"})
            path = resolve_model_path(model)
            return suggest_template(load_tokenizer(build_config({"model_name_or_path": model}, command="chat").model,
                                                   path))

        try:
            return {"ok": True, "template": await run_in_threadpool(suggest)}
        except forms.FormErrors as e:
            return fail({"model_name_or_path": next(iter(e.errors.values()))})
        except LatheError as e:
            return fail({"model_name_or_path": str(e)})

    @app.post("/api/preview")
    async def preview(request: Request) -> Any:
        """A few rendered examples (trained tokens marked) and the length statistics."""
        data = await body(request)

        def build() -> dict[str, Any]:
            from lathe.data.loader import stage_kind
            from lathe.report import build as build_report

            name, keys = page_keys({**data, "form": "train"})
            cfg = forms.check(name, {**keys, "output_dir": keys.get("output_dir") or "-"})
            if stage_kind(cfg.finetune.stage) != "sft":
                raise forms.FormErrors({"stage": f"the preview shows sft-style data; stage {cfg.finetune.stage} "
                                                 "is not shown yet (lathe data inspect neither)"})
            try:
                report, _, _ = build_report(cfg, 3, False)
            except LatheError as e:
                raise forms.FormErrors({forms.error_field(e, "train", keys): str(e)}) from None
            return report

        try:
            report = await run_in_threadpool(build)
        except forms.FormErrors as e:
            return fail(e.errors)
        return {"ok": True, "report": report}

    @app.post("/api/jobs")
    async def start(request: Request) -> Any:
        data = await body(request)
        source = str(data.get("source") or "").strip()
        try:
            name, keys = page_keys(data)
            if name not in OUT_KEY:
                raise forms.FormErrors({"_form": f"the {name} form starts nothing"})
            argv, out = await run_in_threadpool(preflight, name, keys, source)
            job = jobs.start(name, argv, None if name == "predict" else forms.config_yaml(keys), out, cwd)
        except forms.FormErrors as e:
            return fail(e.errors)
        except LatheError as e:  # another job writes there
            return fail({OUT_KEY.get(str(data.get("form")), "_form"): str(e)})
        return {"ok": True, "job": job.summary()}

    @app.get("/api/jobs")
    async def list_jobs() -> Any:
        return {"jobs": [j.summary() for j in jobs.all()]}

    @app.get("/api/jobs/{job_id}")
    async def job_detail(job_id: str) -> Any:
        job = jobs.get(job_id)
        if job is None:
            return fail({"_form": f"no job {job_id}"}, 404)
        return job.detail()

    @app.post("/api/jobs/{job_id}/stop")
    async def stop(job_id: str) -> Any:
        job = jobs.get(job_id)
        if job is None:
            return fail({"_form": f"no job {job_id}"}, 404)
        return {"ok": jobs.stop(job)}

    @app.get("/api/models")
    async def models() -> Any:
        """Folders the chat, evaluate, export and quantize tabs can read: finished jobs' outputs."""
        from lathe.runs import run_state

        found = []
        for job in jobs.all():
            out = job.output
            if out and job.status() == "done" and job.record.get("verb") in ("train", "export", "quantize"):
                path = Path(job.record.get("cwd", ".")) / out
                if path.is_dir() and (run_state(path) == "complete" or (path / "config.json").is_file()):
                    found.append(out)
        return {"models": list(dict.fromkeys(found)) + ["lathe:demo"]}

    @app.get("/api/datasets")
    async def datasets(dataset_dir: str = "data") -> Any:
        """The datasets dataset_info.json in `dataset_dir` names, for the dataset pickers."""
        from lathe.data.registry import load_dataset_info

        try:
            info = load_dataset_info(dataset_dir)
        except LatheError as e:
            return fail({"dataset_dir": str(e)})
        return {"ok": True, "datasets": sorted(info)}

    @app.get("/api/configs")
    async def configs() -> Any:
        folder = workdir / "configs"
        return {"configs": sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []}

    @app.post("/api/configs")
    async def save_config(request: Request) -> Any:
        data = await body(request)
        name = str(data.get("name") or "").strip()
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            return fail({"_config_name": "a config name is letters, digits, - _ and . only"})
        try:
            form_name, keys = page_keys({**data, "form": "train"})
        except forms.FormErrors as e:
            return fail(e.errors)
        folder = workdir / "configs"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.yaml.tmp"
        tmp.write_text(forms.config_yaml(keys), encoding="utf-8")
        os.replace(tmp, folder / f"{name}.yaml")
        return {"ok": True, "path": str(folder / f"{name}.yaml")}

    @app.get("/api/configs/{name}")
    async def load_config(name: str) -> Any:
        import yaml

        path = workdir / "configs" / f"{name}.yaml"
        if "/" in name or not path.is_file():
            return fail({"_config_name": f"no saved config {name}"}, 404)
        keys = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        shown = {k for _, ks in forms.FORMS["train"] for k in ks}
        values = {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in keys.items() if k in shown}
        extra = {k: v for k, v in keys.items() if k not in shown}
        return {"ok": True, "values": values, "extra": forms.config_yaml(extra) if extra else ""}

    def chat_model(data: dict[str, Any]) -> tuple[Any, Any]:
        """The loaded model of the picked folder (loaded once) and the request's full config."""
        _, keys = page_keys({**data, "form": "chat"})
        cfg = forms.check("chat", keys)
        try:
            gen = chat.load(str(data.get("source")), folder_keys(str(data.get("source") or "").strip()))
        except LatheError as e:
            raise forms.FormErrors({"_source": str(e)}) from None
        return gen, cfg

    @app.post("/api/chat/load")
    async def chat_load(request: Request) -> Any:
        data = await body(request)
        try:
            gen, _ = await run_in_threadpool(chat_model, data)
        except forms.FormErrors as e:
            return fail(e.errors)
        return {"ok": True, "notes": chat.notes, "template": gen.template.name,
                "system": gen.template.default_system or ""}

    @app.post("/api/chat")
    async def chat_reply(request: Request) -> Any:
        """Stream one reply as NDJSON lines: {"text": piece} ..., then {"done": true}. Decoded as
        `lathe chat` decodes: the page's sampling keys over the model's own generation_config."""
        from lathe.chat import ChatSession, reply
        from lathe.infer.load import chat_generation

        data = await body(request)
        try:
            gen, cfg = await run_in_threadpool(chat_model, data)
        except forms.FormErrors as e:
            return fail(e.errors)
        history = [(str(u), str(a)) for u, a in data.get("history") or []]
        message = str(data.get("message") or "").strip()
        if not message:
            return fail({"_message": "type a message first"})
        generate, _ = chat_generation(cfg, gen.model, gen.path)
        session = ChatSession(model=gen.model, tokenizer=gen.tokenizer, template=gen.template, generate=generate,
                              cutoff_len=cfg.data.cutoff_len, system=data.get("system") or None,
                              history=history, stop_ids=gen.stop_ids, note=lambda text: None)
        pieces: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                with chat.lock:
                    reply(session, message, on_text=lambda text: pieces.put({"text": text}))
                pieces.put({"done": True})
            except Exception as e:  # the stack goes to the log, the page gets a line
                log.exception("chat failed")
                pieces.put({"error": f"{type(e).__name__}: {e}"})

        threading.Thread(target=work, daemon=True).start()

        async def stream() -> Any:
            while True:
                item = await asyncio.get_running_loop().run_in_executor(None, pieces.get)
                yield json.dumps(item, ensure_ascii=False) + "\n"
                if "done" in item or "error" in item:
                    return

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    return app
