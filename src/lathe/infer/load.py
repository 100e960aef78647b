"""A trained model ready to generate: loaded once, with the template and the settings it
was trained with. Chat, the API server and the web UI load through `load_generator`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lathe.config.schema import GenerateConfig, LatheConfig
from lathe.data.templates import Template, get_template
from lathe.errors import ConfigError

Note = Callable[[str], None]


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Generator:
    """A loaded model, its tokenizer, the template it was trained with, the tokens that end a
    reply and the generation settings chosen for it (`chat_generation`)."""

    model: Any
    tokenizer: Any
    template: Template
    stop_ids: list[int]
    generate: GenerateConfig
    path: str
    task: str  # causal_lm, seq2seq, seq_cls, token_cls, reward, qa, embed (lathe.model.load.TASKS)

    @property
    def context_len(self) -> int | None:
        """Most tokens (prompt and reply) the model can attend to, when its config says."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


def load_generator(cfg: LatheConfig, note: Note = _to_stderr) -> Generator:
    """Base model + adapters (or a run directory, an export, a quantized folder) with the
    training template; an unfinished adapter run is refused before anything loads."""
    from lathe.model.load import load_for_inference, stage_task
    from lathe.runs import check_inputs

    check_inputs(cfg)
    if cfg.is_set("template"):
        get_template(cfg.data.template)  # an unknown name fails before the model loads
    reward = reward_run(cfg)
    if reward is not None:
        model, tokenizer, path = _load_reward(cfg, reward)
        task = "reward"
    else:
        model, tokenizer, path = load_for_inference(cfg)
        task = stage_task(cfg.finetune.stage)
    template = choose_template(cfg, tokenizer, path, note)
    stop_ids = template.stop_token_ids(tokenizer)  # also checks that template: auto can render
    generate, source = chat_generation(cfg, model, path)
    if task in ("causal_lm", "seq2seq"):
        note(f"Generation: {describe_generation(generate)} ({source})")
    return Generator(model, tokenizer, template, stop_ids, generate, path, task)


def choose_template(cfg: LatheConfig, tokenizer: Any, model_path: str, note: Note = _to_stderr) -> Template:
    """`template` when the user set it; else the one the run was trained with (the config.yaml
    of the last adapter, or of the model folder for a full fine-tuning run), as export does;
    else the model's own chat_template (`auto`, e.g. an exported model); else the default."""
    from lathe.runs import trained_template

    if cfg.is_set("template"):
        return get_template(cfg.data.template)
    run_dir, recorded = trained_template(cfg, model_path)
    if recorded:
        try:
            template = get_template(recorded)
        except ConfigError as e:
            raise ConfigError(f"{run_dir}/config.yaml: {e.args[0]}; set template: in your config") from None
        note(f"Template: {recorded} (from {run_dir}/config.yaml, the config it was trained with)")
        return template
    if getattr(tokenizer, "chat_template", None):
        note("Template: auto (template is not set; using the model's own chat_template)")
        return get_template("auto")
    note(f"Template: {cfg.data.template} (the default: template is not set and the model has no "
         "chat_template; set template to the one the model was trained with)")
    return get_template(cfg.data.template)


_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams")


def chat_generation(cfg: LatheConfig, model: Any, model_path: str) -> tuple[GenerateConfig, str]:
    """The settings chat decodes with, and where they came from: the keys the user set win;
    the rest come from the model's own generation_config.json when it ships one (a released
    chat model's tuned sampling); otherwise greedy, which a freshly tuned small model answers
    best with (sampling at temperature 1 corrupts its replies)."""
    import dataclasses

    gen_cfg = getattr(model, "generation_config", None)
    shipped = gen_cfg is not None and _ships_generation_config(model_path)
    values: dict[str, Any] = {"do_sample": False}  # transformers' default, and ours for chat
    if shipped:
        for key in _SAMPLING_KEYS:
            value = getattr(gen_cfg, key, None)
            if value is not None:
                values[key] = value
        source = "the model's generation_config.json"
    else:
        source = "greedy: the model ships no generation_config.json"
    values = {k: v for k, v in values.items() if not cfg.is_set(k)}
    chosen = dataclasses.replace(cfg.generate, **values)
    if any(cfg.is_set(k) for k in (*_SAMPLING_KEYS, "max_new_tokens")):
        source += "; your keys win"
    return chosen, source


def _ships_generation_config(model_path: str) -> bool:
    """Whether the model folder (or the hub repo, as cached by the load) has generation_config.json."""
    from pathlib import Path

    if Path(model_path).is_dir():
        return (Path(model_path) / "generation_config.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_path, "generation_config.json"), str)


def describe_generation(gen: GenerateConfig) -> str:
    if gen.num_beams > 1:
        how = f"beam search, {gen.num_beams} beams"
    elif gen.do_sample:
        how = f"sampling, temperature {gen.temperature}, top_p {gen.top_p}, top_k {gen.top_k or 'off'}"
    else:
        how = "greedy"
    extra = f", repetition_penalty {gen.repetition_penalty}" if gen.repetition_penalty != 1.0 else ""
    return f"{how}{extra}, max_new_tokens {gen.max_new_tokens}"


def reward_run(cfg: LatheConfig) -> str | None:
    """The rm run directory the config points at (the last adapter, or the model folder), if
    it is one (its reward_model.json says so)."""
    from pathlib import Path

    from lathe.model.reward import MARKER

    adapters = cfg.model.adapter_name_or_path or []
    folder = Path(adapters[-1] if adapters else cfg.model.model_name_or_path).expanduser()
    return str(folder) if (folder / MARKER).is_file() else None


def _load_reward(cfg: LatheConfig, folder: str) -> tuple[Any, Any, str]:
    """A reward model (lathe.model.reward), as ppo loads it, with its run's tokenizer."""
    from lathe.model.load import fix_pad_token, load_tokenizer, pick_dtype
    from lathe.model.reward import load_reward_model

    tokenizer = load_tokenizer(cfg.model, folder)
    fix_pad_token(tokenizer)
    return load_reward_model(folder, pick_dtype(cfg), tokenizer, cfg.model.trust_remote_code), tokenizer, folder
