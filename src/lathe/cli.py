"""`lathe <command>`: train, pipeline, data inspect, eval, export, chat, demo, keys.

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

    t = sub.add_parser("train", help="train from a YAML/JSON config (key=value overrides win)")
    t.add_argument("config", help="path to a YAML or JSON config (e.g. examples/sft_lora.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    p.set_defaults(data_parser=_data_parser(sub))

    pl = sub.add_parser("pipeline", help="run stages in order (pt -> sft -> rm -> ppo ...), skipping finished ones",
                        description="Run the stages a pipeline file lists, each reading the previous "
                                    "one's output; stages whose output_dir holds a complete run are skipped.")
    pl.add_argument("config", help="pipeline file with `stages:` (e.g. examples/pipeline/rlhf.yaml)")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="keys to override in every stage")
    pl.add_argument("--dry-run", action="store_true", help="only say which stages would run")
    pl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    e = sub.add_parser("eval", help="score a model on multiple-choice benchmarks (MMLU / C-Eval / CMMLU layout)",
                       description="Answer every question of a benchmark by comparing the logits of the "
                                   "choice letters; report accuracy per subject and category.")
    e.add_argument("config", help="YAML with model_name_or_path (+ adapter_name_or_path), template, task, task_dir")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    x = sub.add_parser("export", help="merge adapters into the base model, save shards, verify the result",
                       description="Merge LoRA adapters into the base model and save it with its "
                                   "tokenizer, chat template and stop tokens; then reload the export with "
                                   "plain transformers and check its logits and chat template.")
    x.add_argument("config", help="YAML with model_name_or_path, adapter_name_or_path, template, export_dir")
    x.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override")
    x.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    c = sub.add_parser("chat", help="chat in the terminal (or with messages piped in, one per line)",
                       description="Multi-turn chat with streaming replies, using the training template. "
                                   "Type /clear to forget the history, /exit to leave.")
    c.add_argument("config", help="YAML with model_name_or_path (+ adapter_name_or_path) and template")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override")
    c.add_argument("--system", default=None, help="system prompt (default: the template's)")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    d = sub.add_parser("demo", help="build the tiny demo model and teach it who it is")
    d.add_argument("--output-dir", default=None, help="run directory (default runs/demo-<time>)")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    sub.add_parser("keys", help="list every config key with its default and meaning")
    return p


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
    i.add_argument("config", help="path to a YAML or JSON training config")
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
    """Parse; `key=value` overrides may also follow options (`... -n 5 cutoff_len=256`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    late = [x for x in extra if "=" in x and not x.startswith("-")]
    if late and getattr(args, "overrides", None) is not None:
        args.overrides += late
        extra = [x for x in extra if x not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


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
        _quiet_library_warnings()

    try:
        if args.command == "train":
            from lathe.api import train

            train(args.config, args.overrides)
        elif args.command == "pipeline":
            from lathe.pipeline import run_pipeline

            run_pipeline(args.config, args.overrides, dry_run=args.dry_run)
        elif args.command == "eval":
            from lathe.config.load import load_config
            from lathe.eval.bench import run_benchmark

            run_benchmark(load_config(args.config, args.overrides, command="eval"))
        elif args.command == "export":
            from lathe.config.load import load_config
            from lathe.export import run_export

            run_export(load_config(args.config, args.overrides, command="export"))
        elif args.command == "chat":
            from lathe.chat import run_chat
            from lathe.config.load import load_config

            run_chat(load_config(args.config, args.overrides, command="chat"), system=args.system)
        elif args.command == "demo":
            from lathe.demo.run import run_demo

            run_demo(args.output_dir)
        elif args.command == "data":
            from lathe.report import DEFAULT_PLOT, inspect_data

            inspect_data(args.config, args.overrides, n=args.n, output=args.output,
                         plot=args.plot or DEFAULT_PLOT, color=args.color)
        elif args.command == "keys":
            print_keys()
        return 0
    except LatheError as e:
        if debug:
            raise
        print(str(e), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


def _quiet_library_warnings() -> None:
    """Library deprecation chatter is for developers (`--debug` shows it), not users."""
    import warnings

    for module in ("transformers", "peft", "torch", "accelerate", "datasets"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def print_keys() -> None:
    import dataclasses

    from lathe.config.schema import SECTIONS

    for section, cls in SECTIONS.items():
        print(f"[{section}]")
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            help_text = textwrap.shorten(f.metadata.get("help", ""), 90)
            print(f"  {f.name:<28} {str(default):<12} {help_text}")
    print("Any other transformers.TrainingArguments field is passed through as is.")


if __name__ == "__main__":
    sys.exit(main())
