"""`lathe <command>`: train, pipeline, data inspect, eval, export, chat, demo, download, doctor, keys.

A user's mistake (a `LatheError`) prints one line and exits with code 2; `--debug`
or LATHE_DEBUG=1 shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lathe",
        description="Fine-tune language models end to end from one YAML file.",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="<command>")

    _config_verb(sub, "train", "train from a YAML/JSON config (key=value overrides win)",
                 "path to a YAML or JSON config (e.g. examples/sft_lora.yaml); optional when every key is "
                 "given as key=value or --key value",
                 overrides_help="config keys to override; --key value, --key=value and --flag work too")

    p.set_defaults(data_parser=_data_parser(sub))

    pl = _config_verb(sub, "pipeline", "run stages in order (pt -> sft -> rm -> ppo ...), skipping finished ones",
                      "pipeline file with `stages:` (e.g. examples/pipeline/rlhf.yaml)", optional=False,
                      description="Run the stages a pipeline file lists, each reading the previous one's output; "
                                  "stages whose output_dir holds a complete run are skipped.",
                      overrides_help="keys to override in every stage")
    pl.add_argument("--dry-run", action="store_true", help="only say which stages would run")

    pn = _config_verb(sub, "plan", "before training: memory per device, tokens/s and duration, from the config alone",
                      "a training config", optional=False,
                      description="Estimate what `lathe train CONFIG` will need per device: weights, gradients, "
                                  "optimizer states (per method and ZeRO stage), activations (with and without "
                                  "gradient checkpointing), logits and the runtime; its tokens/s and duration; and "
                                  "what to change when it will not fit. Reads the model's config.json (never its "
                                  "weights) and the data; trains and writes nothing.",
                      overrides_help="config keys to override; gpus=N and gpu_memory=GiB plan for another machine "
                                     "(gpus=8 deepspeed=ds_z3)")
    pn.add_argument("--output", default=None, metavar="PLAN.json", help="also write the plan as JSON")
    _config_verb(sub, "cv", "k-fold cross-validation: one run per fold, each metric's mean and std",
                 "a training config (e.g. examples/cls_sentiment.yaml)",
                 description="Deal the training rows into folds (folds=K; stratified for classifiers), train once "
                             "per fold holding it out for validation (output_dir/fold-k), then report each metric "
                             "per fold with its mean and standard deviation: cv_results.json, a table and "
                             "cv_results.png. Finished folds are kept when it runs again.",
                 overrides_help="config keys to override (folds=5 ...)")
    _config_verb(sub, "tune", "hyperparameter search (Optuna): trials of the config over its search_space",
                 "a training config with a search_space (e.g. examples/tune_lora.yaml)",
                 description="Train one run per trial (output_dir/trials/trial-NNN) with values drawn from "
                             "search_space (TPE, random or grid), stop the bad ones early (median pruner), and keep "
                             "the study in output_dir/study.db (resume=true continues it). Writes tune_results.json, "
                             "a table, optimization_history.png, param_importances.png and best/config.yaml "
                             "(lathe train runs it).",
                 overrides_help="config keys to override (n_trials=8 ...)")
    _config_verb(sub, "predict", "predict with a trained run: its held-out rows, or eval_dataset=...",
                 "a training config (its output_dir is the run) or a run directory", optional=False,
                 description="Load the model a run trained (a run directory, or the config that wrote it) and "
                             "predict every row of its eval set (or eval_dataset=NAME): labels with probabilities "
                             "for cls, generated replies scored with BLEU/ROUGE for sft. Results go to "
                             "<run>/predict (or output_dir=...).")
    _config_verb(sub, "quantize", "quantize a trained model (int8 dynamic/static, weight-only, mixed) and report "
                 "size, memory, latency and quality",
                 "a YAML naming model_name_or_path (a run or export), quantization_scheme and output_dir; or the "
                 "run directory itself", optional=False,
                 description="Quantize the model of a run directory or an export into output_dir (a model folder "
                             "chat, eval and predict load), then measure the float and quantized models side by "
                             "side: quantize_report.json, a table and a chart.")
    _config_verb(sub, "eval", "score a model on multiple-choice benchmarks (MMLU / C-Eval / CMMLU layout)",
                 "YAML with model_name_or_path (+ adapter_name_or_path), template, task, task_dir",
                 description="Answer every question of a benchmark by comparing the logits of the choice letters; "
                             "report accuracy per subject and category.")
    _config_verb(sub, "export", "merge adapters into the base model, save shards, verify the result",
                 "YAML with model_name_or_path, adapter_name_or_path, template, export_dir",
                 description="Merge LoRA adapters into the base model and save it with its tokenizer, chat template "
                             "and stop tokens; then reload the export with plain transformers and check its logits "
                             "and chat template.")
    c = _config_verb(sub, "chat", "chat in the terminal (or with messages piped in, one per line)",
                     "YAML with model_name_or_path (+ adapter_name_or_path) and template; or an export or run "
                     "directory",
                     description="Multi-turn chat with streaming replies, using the training template. Type /clear "
                                 "to forget the history, /exit to leave.")
    c.add_argument("--system", default=None, help="system prompt (default: the template's)")

    _config_verb(sub, "api", "serve a trained model over the OpenAI API (chat, completions, streaming, tools)",
                 "YAML with model_name_or_path (+ adapter_name_or_path) and the serve keys (e.g. examples/api.yaml); "
                 "or a run directory, an export or a quantized model", optional=False,
                 description="An OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions (stream, n, "
                             "stop, logprobs, tools, json_object), POST /v1/completions, GET /health. Requests that "
                             "arrive together are decoded in one batch. Listens on 127.0.0.1:8000 unless host= / "
                             "port= say otherwise; api_key=KEY makes clients send it.")
    w = sub.add_parser("webui", help="a web page to train, watch, evaluate, chat and export (English and Chinese)",
                       description="Serve the web UI (http://127.0.0.1:7860). Forms are generated from the config "
                                   "schema; what they start is a lathe process of its own, so closing the page or "
                                   "this server loses no run.")
    w.add_argument("overrides", nargs="*", metavar="key=value",
                   help="host=127.0.0.1 port=7860 lang=en|zh workdir=webui (jobs and saved configs)")
    w.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    d = sub.add_parser("demo", help="build the tiny demo model and teach it who it is")
    d.add_argument("--output-dir", default=None, help="run directory (default runs/demo-<time>)")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    dl = sub.add_parser("download", help="fetch a model (Hugging Face id or modelscope:org/name) into a folder, "
                        "for later offline use; an interrupted download resumes",
                        description="Download every file of a model into --to DIR (resuming what an earlier, "
                                    "interrupted run left there), then check its weights. DIR is then a "
                                    "model_name_or_path that needs no network.")
    dl.add_argument("model", help="a Hugging Face id (Qwen/Qwen2.5-0.5B-Instruct) or modelscope:org/name")
    dl.add_argument("--to", required=True, help="the folder to download into (new, empty, or an earlier "
                    "download of the same model)")
    dl.add_argument("--revision", default=None, help="branch, tag or commit (default: the hub's default)")
    dl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    doc = sub.add_parser("doctor", help="versions, devices, dtypes, attention kernels, disk and network; known "
                         "problems with what to do",
                         description="Report what this machine has for Lathe and the version combinations known to "
                                     "fail. With --strict, exit code 1 when it finds a problem.")
    doc.add_argument("--json", action="store_true", help="the report as JSON (for a bug report)")
    doc.add_argument("--strict", action="store_true", help="exit with 1 when a problem is found (setup scripts)")
    doc.add_argument("--output-dir", default=".", help="where runs will be written (its free space is checked)")
    sub.add_parser("methods", help="each fine-tuning method: its keys, and what it can and cannot do",
                   description="The finetuning_type values, from the method registry.")

    k = sub.add_parser("keys", help="list every config key with its default and meaning",
                       description="Every key Lathe reads: its own, then the transformers "
                                   "TrainingArguments fields it passes through.")
    k.add_argument("--from-llamafactory", action="store_true",
                   help="instead: every LLaMA-Factory key and what Lathe does with it")
    return p


def _config_verb(sub, name: str, help: str, config_help: str, *, optional: bool = True,
                 description: str | None = None,
                 overrides_help: str = "config keys to override") -> argparse.ArgumentParser:
    """A verb that reads a config (or a folder) and key=value overrides, with --debug."""
    verb = sub.add_parser(name, help=help, description=description)
    verb.add_argument("config", nargs="?" if optional else None, help=config_help)
    verb.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return verb


# Verbs that are one function of lathe.api, called with the config and the overrides.
API_VERBS = ("train", "cv", "tune", "predict", "quantize")


def _data_parser(sub) -> argparse.ArgumentParser:
    data = sub.add_parser("data", help="look at training data (lathe data inspect)",
                          description="Look at training data the way a training run sees it.")
    data_sub = data.add_subparsers(dest="data_command", metavar="<data command>")
    i = data_sub.add_parser(
        "inspect", help="show what the model is trained on: examples, lengths, truncation, padding",
        description="Render examples with their trained tokens marked, measure token lengths, "
                    "truncation and padding, and warn about common data mistakes. Reads the same "
                    "config as `lathe train`; nothing is trained and output_dir is never written.",
    )
    i.add_argument("config", nargs="?", help="path to a YAML or JSON training config")
    i.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override")
    i.add_argument("-n", type=int, default=3, metavar="N", help="rendered examples to show (default 3)")
    i.add_argument("--output", default=None, metavar="REPORT.json", help="also write the figures as JSON")
    i.add_argument("--plot", default=None, metavar="PATH",
                   help="length histogram PNG (default data_report_lengths.png)")
    i.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="colour trained tokens (default: when stdout is a terminal)")
    i.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return data


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; `key=value` overrides may also follow options (`... -n 5 cutoff_len=256`).

    Config keys may also be written the way LLaMA-Factory's and Hugging Face's guides write
    them: `--stage sft --do_train --lora_target q_proj,v_proj --fp16` (`--key value`,
    `--key=value`, or a bare `--flag` for true), with or without a config file first and
    mixed with `key=value`; all of them are overrides, applied in the order given.
    """
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _flags_to_overrides(argv, parser)
    args, extra = parser.parse_known_args(argv)
    late = [x for x in extra if _is_override(x)]
    if late and getattr(args, "overrides", None) is not None:
        args.overrides += late
        extra = [x for x in extra if x not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    config = getattr(args, "config", None)
    if config is not None and _is_override(config) and not os.path.exists(config):
        args.overrides.insert(0, config)  # no config file: the first token was already a key
        args.config = None
    return args


def _model_folder(args: argparse.Namespace) -> dict | None:
    """`lathe chat|eval|export|api <folder>`: an export or a run directory stands for its model
    keys (the overrides still win); None when `config` is a file (or absent)."""
    if args.config is None or not os.path.isdir(args.config):
        return None
    from lathe.runs import model_keys

    keys = model_keys(args.config)
    args.config = None
    return keys


def _is_override(token: str) -> bool:
    key, sep, _ = token.partition("=")
    return bool(sep) and not token.startswith("-") and key.replace("-", "_").isidentifier()


def _flags_to_overrides(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--key value`, `--key=value` and bare `--flag` -> `key=value` / `flag=true`, for every
    option that is not one of the command's own (`--debug`, `--dry-run`, `--system` ...)."""
    start = _subcommand_index(argv)
    if start < 0:
        return argv
    sub = _subcommand_parser(argv[start], parser)
    own = set(sub._option_string_actions)
    out = argv[:start + 1]
    i = start + 1
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if token == "--" or not token.startswith("--") or name in own:
            out.append(token)
            if name in own and "=" not in token and _takes_value(sub, name) and i + 1 < len(argv):
                out.append(argv[i + 1])  # the option's own value, never a config key
                i += 1
            i += 1
            continue
        key = name[2:]
        if "=" in token:
            out.append(f"{key}={token.split('=', 1)[1]}")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and not _is_override(argv[i + 1]):
            out.append(f"{key}={argv[i + 1]}")
            i += 1
        else:
            out.append(f"{key}=true")  # a bare flag
        i += 1
    return out


_CONFIG_COMMANDS = (*API_VERBS, "plan", "pipeline", "eval", "export", "chat", "api", "data", "webui")


def _subcommand_index(argv: list[str]) -> int:
    """Where the verb is (`lathe --debug train ...`: 1), or -1; for `data`, its sub-verb."""
    for i, token in enumerate(argv):
        if token.startswith("-"):
            continue
        if token == "data":
            return i + 1 if i + 1 < len(argv) and argv[i + 1] == "inspect" else -1
        return i if token in _CONFIG_COMMANDS else -1
    return -1


def _subcommand_parser(verb: str, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if verb == "inspect":
        data = subs.choices["data"]
        subs = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    return subs.choices[verb]


def _takes_value(sub: argparse.ArgumentParser, option: str) -> bool:
    action = sub._option_string_actions[option]
    return action.nargs != 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    debug = getattr(args, "debug", False) or os.environ.get("LATHE_DEBUG", "0") not in ("0", "")
    if args.command is None:
        _parser().print_help()
        return EXIT_USER_ERROR
    if args.command == "data" and args.data_command is None:
        args.data_parser.print_help()
        return EXIT_USER_ERROR
    from lathe.errors import LatheError

    if not debug:
        from lathe.quiet import quiet_warnings

        quiet_warnings()

    try:
        if args.command in API_VERBS:
            import lathe.api

            getattr(lathe.api, args.command)(args.config, args.overrides)
        elif args.command == "plan":
            from lathe.plan import plan

            plan(args.config, args.overrides, output=args.output)
        elif args.command == "pipeline":
            from lathe.pipeline import run_pipeline

            run_pipeline(args.config, args.overrides, dry_run=args.dry_run)
        elif args.command in ("eval", "export", "chat", "api"):
            from lathe.config.load import load_config, parse_overrides

            folder = _model_folder(args)
            keys = {**(folder or {}), **parse_overrides(args.overrides)}
            cfg = load_config(None if folder is not None else args.config, keys, command=args.command)
            if args.command == "eval":
                from lathe.eval.bench import run_benchmark

                run_benchmark(cfg)
            elif args.command == "export":
                from lathe.export import run_export

                run_export(cfg)
            elif args.command == "api":
                from lathe.serve import run_api

                run_api(cfg)
            else:
                from lathe.chat import run_chat

                run_chat(cfg, system=args.system)
        elif args.command == "webui":
            from lathe.webui import run_webui

            run_webui(args.overrides)
        elif args.command == "demo":
            from lathe.demo.run import run_demo

            run_demo(args.output_dir)
        elif args.command == "data":
            from lathe.report import DEFAULT_PLOT, inspect_data

            inspect_data(args.config, args.overrides, n=args.n, output=args.output,
                         plot=args.plot or DEFAULT_PLOT, color=args.color)
        elif args.command == "download":
            from lathe.model.fetch import download

            out = download(args.model, args.to, args.revision)
            print(f"Downloaded {args.model} into {out}; set model_name_or_path: {out}")
        elif args.command == "doctor":
            from lathe.doctor import run_doctor

            return run_doctor(as_json=args.json, output_dir=args.output_dir, strict=args.strict)
        elif args.command == "methods":
            print_methods()
        elif args.command == "keys":
            if args.from_llamafactory:
                print_llamafactory_keys()
            else:
                print_keys()
        return 0
    except LatheError as e:
        if debug:
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one process of a launched run: once per machine
            print(str(e), file=sys.stderr)
        return getattr(e, "code", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lathe keys | head -1`: the reader has gone, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:  # one process of several: a peer that died or hung is not this process's bug
        from lathe.distributed import peer_failure

        said = None if debug else peer_failure(e)
        if said is None:
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(said, file=sys.stderr)
        return 1


def print_keys() -> None:
    import dataclasses

    from lathe.config.load import NOT_PASSED
    from lathe.config.schema import SECTIONS

    width = 100
    own: set[str] = set()
    for section, cls in SECTIONS.items():
        print(f"[{section}]")
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            own.add(f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            _print_key(f.name, default, f.metadata.get("help", ""), width)
    from transformers import TrainingArguments

    print("[transformers.TrainingArguments, passed through as given]")
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name in own or f.name in NOT_PASSED:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        _print_key(f.name, default, _first_sentence(f.metadata.get("help", "")), width)


_HELP_COLUMN = 46  # "  <key, 30> <default, 12> "


def _print_key(name: str, default: object, help_text: str, width: int) -> None:
    head = f"  {name:<30} {str(getattr(default, 'value', default)):<12} "
    if len(head) > _HELP_COLUMN:  # a long default: the help text goes on the next line
        print(head.rstrip())
        head = " " * _HELP_COLUMN
    lines = textwrap.wrap(" ".join(help_text.split()), width - len(head)) or [""]
    print(head + lines[0])
    for line in lines[1:]:
        print(" " * len(head) + line)


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def print_methods() -> None:
    import dataclasses

    from lathe.config.checks import method_keys
    from lathe.config.schema import FinetuneConfig
    from lathe.model.methods import all_methods

    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    for m in all_methods():
        print(f"{m.name}: {m.summary}")
        saved = ("an adapter; lathe export merges it into the base weights" if m.can_merge else
                 "an adapter; lathe export writes base + adapter (it cannot merge)") if m.adapter \
            else "the whole model"
        print(f"  run dir      {saved}")
        print(f"  dpo/kto/ppo  reference: {m.reference}")
        print(f"  QLoRA        {'trains on a 4/8-bit base (quantization_bit)' if m.quantized_base else 'no'}")
        print(f"  stages       {', '.join(m.stages)}" + ("" if m.packs else "; no packing (peft drops the "
                                                           "position ids of packed rows)"))
        for key in method_keys(m.name):
            f = fields[key]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            _print_key(key, default, f.metadata.get("help", ""), 100)
        print()


def print_llamafactory_keys() -> None:
    from lathe.config.llamafactory import KEYS, describe

    group = None
    for key, entry in KEYS.items():
        if entry.group != group:
            group = entry.group
            print(f"[{group}]")
        lines = textwrap.wrap(describe(key, entry), 66) or [""]
        print(f"  {key:<32} {lines[0]}")
        for line in lines[1:]:
            print(" " * 35 + line)
    print("Keys of transformers.TrainingArguments (learning_rate, bf16, ddp_timeout ...) are "
          "read as they are.")


if __name__ == "__main__":
    sys.exit(main())
