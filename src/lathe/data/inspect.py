"""Show people what the model is trained on.

Pure pieces of `lathe data inspect`: marking trained tokens, length statistics,
truncation and padding figures, duplicates, warnings about common mistakes, the
report dict and its text, and the length histogram. The orchestration (config,
tokenizer, reading the data) lives in `lathe.report`.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lathe.data.collators import PAD_MULTIPLE
from lathe.data.conversation import RESPONSE_ROLES
from lathe.data.packing import first_fit_decreasing, padding_fraction, padding_free_fraction
from lathe.data.processors import IGNORE_INDEX

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"

def trained_segments(input_ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """An example decoded in runs of tokens: (text, whether those tokens are trained)."""
    parts: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            parts.append((tokenizer.decode(input_ids[start:i], skip_special_tokens=False),
                          labels[start] != IGNORE_INDEX))
            start = i
    return parts


def mark_trained(input_ids: list[int], labels: list[int], tokenizer: Any, color: bool) -> str:
    """Decode an example; trained spans are green (colour) or wrapped in [[ ]] (plain)."""
    if color:
        return "".join(f"{GREEN if trained else DIM}{text}{RESET}"
                       for text, trained in trained_segments(input_ids, labels, tokenizer))
    return "".join(f"[[{text}]]" if trained else text
                   for text, trained in trained_segments(input_ids, labels, tokenizer))


# --- per-row lengths -------------------------------------------------------------------

@dataclass(frozen=True)
class RowLengths:
    """One row's token counts before truncation, and what survives truncation.

    `prompt` counts tokens that are not trained, `response` those that are (with
    train_on_prompt the prompt is trained too). `kept_trained == 0` means the row is
    dropped: truncation left no token to train on.
    """

    prompt: int
    response: int
    kept_total: int
    kept_trained: int

    @property
    def total(self) -> int:
        return self.prompt + self.response

    @property
    def dropped(self) -> bool:
        return self.kept_trained == 0


def count_trained(labels: Sequence[int]) -> int:
    return sum(1 for t in labels if t != IGNORE_INDEX)


def row_lengths(full: dict[str, list[int]], kept: dict[str, list[int]]) -> RowLengths:
    """From the untruncated encoding and the one cut to cutoff_len (tokenize_conversation's)."""
    trained = count_trained(full["labels"])
    return RowLengths(prompt=len(full["input_ids"]) - trained, response=trained,
                      kept_total=len(kept["input_ids"]), kept_trained=count_trained(kept["labels"]))


# --- statistics ------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (a value that occurs in the data); `q` in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def length_stats(values: Sequence[int]) -> dict[str, float | int | None]:
    """min / median / p95 / max / mean of token counts (None for no values)."""
    if not values:
        return {"min": None, "median": None, "p95": None, "max": None, "mean": None}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
        "max": max(values),
        "mean": round(sum(values) / len(values), 2),
    }


def truncation_summary(rows: Sequence[RowLengths], cutoff_len: int) -> dict[str, int]:
    """Rows that fit, are cut (but keep a trained token), or are dropped; fit + cut + dropped = rows."""
    dropped = [r for r in rows if r.dropped]
    cut = [r for r in rows if not r.dropped and r.total > cutoff_len]
    kept = [r for r in rows if not r.dropped]
    return {
        "cutoff_len": cutoff_len,
        "rows": len(rows),
        "fit": len(rows) - len(cut) - len(dropped),
        "cut": len(cut),
        "dropped": len(dropped),
        "tokens_kept": sum(r.kept_total for r in kept),
        "trained_tokens_kept": sum(r.kept_trained for r in kept),
        "tokens_removed": sum(r.total - r.kept_total for r in kept) + sum(r.total for r in dropped),
        "trained_tokens_removed": sum(r.response - r.kept_trained for r in rows),
    }


# --- duplicates and empty replies ------------------------------------------------------

def row_key(row: dict) -> str:
    """A row's content, without where it came from."""
    content = {k: v for k, v in row.items() if k != "origin"}
    return hashlib.sha1(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def duplicate_rows(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(origin of the repeat, origin of the first occurrence) for every exact repeat."""
    first: dict[str, str] = {}
    out = []
    for row in rows:
        key = row_key(row)
        if key in first:
            out.append((row.get("origin", ""), first[key]))
        else:
            first[key] = row.get("origin", "")
    return out


def empty_replies(rows: Sequence[dict]) -> list[str]:
    """Origins of rows with a reply (any turn) that is empty or only whitespace."""
    out = []
    for row in rows:
        roles, contents = row.get("roles") or [], row.get("contents") or []
        if any(r in RESPONSE_ROLES and not c.strip() for r, c in zip(roles, contents)):
            out.append(row.get("origin", ""))
    return out


# --- warnings --------------------------------------------------------------------------

def template_warnings(template: Any, tokenizer: Any) -> list[str]:
    """The model never learns to stop: no end token after replies, or none in the tokenizer."""
    out = []
    # efficient_eos templates (chatglm2/3, baichuan2) train the eos after the last reply and
    # the next prompt's opening stop word after earlier ones: they do learn to stop.
    ends = ("{eos}" in template.assistant or template.efficient_eos
            or any(w in template.assistant for w in template.stop_words))
    if not ends:
        out.append(
            f"template {template.name!r}: the assistant turn ({template.assistant!r}) ends without an "
            "end token ({eos} or a stop word), so the model never learns to stop; choose a template "
            "that ends replies with one"
        )
    if getattr(tokenizer, "eos_token", None) is None:
        out.append(
            "the tokenizer has no eos_token: {eos} renders as nothing and generation cannot stop at "
            "eos; use a tokenizer that defines one"
        )
    return out


def _n(count: int, one: str, many: str) -> str:
    """'1 row repeats' / '2 rows repeat'."""
    return f"{count} {one if count == 1 else many}"


def _examples(origins: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(o for o in origins[:n] if o)
    more = f", +{len(origins) - n} more" if len(origins) > n else ""
    return f" (e.g. {shown}{more})" if shown else ""


def data_warnings(truncation: dict[str, int], duplicates: Sequence[tuple[str, str]],
                  empty: Sequence[str], dropped_empty: int = 0) -> list[str]:
    """Warnings about the rows themselves."""
    out = []
    rows, cutoff = truncation["rows"], truncation["cutoff_len"]

    def of(count: int, verb_one: str, verb_many: str) -> str:  # "1 of 10 rows is", "2 of 10 rows are"
        return f"{count} of {_n(rows, 'row', 'rows')} {verb_one if count == 1 else verb_many}"

    if empty:
        out.append(f"{of(len(empty), 'has', 'have')} an empty reply{_examples(empty)}; "
                   "the model learns to answer with nothing")
    if dropped_empty:
        out.append(f"{_n(dropped_empty, 'row is', 'rows are')} skipped for an empty last reply "
                   "(min_response_chars)")
    if truncation["dropped"]:
        out.append(f"{of(truncation['dropped'], 'is', 'are')} dropped: with cutoff_len={cutoff} no "
                   "response token is left; raise cutoff_len")
    if truncation["cut"] and truncation["cut"] * 10 >= rows:
        out.append(f"{of(truncation['cut'], 'is', 'are')} longer than cutoff_len={cutoff} and cut; "
                   "raise cutoff_len if the ends of replies matter")
    if duplicates:
        repeat, first = duplicates[0]
        where = f" (e.g. {repeat} repeats {first})" if repeat and first else ""
        out.append(f"{_n(len(duplicates), 'row repeats', 'rows repeat')} an earlier row exactly{where}; "
                   "set dedup: true to drop them")
    return out


# --- the report ------------------------------------------------------------------------

def build_report(rows: Sequence[RowLengths], cutoff_len: int, batch_size: int,
                 pad_to_multiple_of: int = PAD_MULTIPLE) -> dict[str, Any]:
    """Length statistics, truncation and padding figures (JSON-ready).

    Padding is estimated the way the trainer batches: rows shuffled, each batch padded
    to its longest row rounded up to `pad_to_multiple_of` (`lathe.data.packing`'s
    estimate, the same figure the training summary prints).
    """
    kept = [r.kept_total for r in rows if not r.dropped]
    padding: dict[str, Any] = {
        "batch_size": batch_size,
        "pad_to_multiple_of": pad_to_multiple_of,
        "without_packing": round(padding_fraction(kept, batch_size, multiple_of=pad_to_multiple_of), 4),
        "with_packing": round(padding_fraction(kept, batch_size, packed=True, capacity=cutoff_len,
                                               multiple_of=pad_to_multiple_of), 4),
        "packed_rows": len(first_fit_decreasing(kept, cutoff_len)),
        # padding-free batches (sft's default where the model allows): the same examples per step
        "padding_free": round(padding_free_fraction(kept, batch_size, multiple_of=pad_to_multiple_of), 4),
    }
    return {
        "rows": len(rows),
        "lengths": {
            "prompt": length_stats([r.prompt for r in rows]),
            "response": length_stats([r.response for r in rows]),
            "total": length_stats([r.total for r in rows]),
        },
        "truncation": truncation_summary(rows, cutoff_len),
        "padding": padding,
    }


def _num(x: float | int | None) -> str:
    if x is None:
        return "-"
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def format_report(report: dict[str, Any], examples: Sequence[str], color: bool = False) -> str:
    """The report as text for a terminal; `examples` are already marked."""
    c = report.get("config", {})
    lines = [
        f"Data report: {', '.join(c.get('dataset') or [])} ({report['rows']} rows), "
        f"template {c.get('template')}, cutoff_len {c.get('cutoff_len')}",
    ]
    how = f"{GREEN}green{RESET}" if color else "[[...]]"
    for i, text in enumerate(examples, 1):
        ex = report["examples"][i - 1]
        lines += ["", f"--- example {i}/{len(examples)}: {ex['origin']}, {ex['tokens']} tokens, "
                      f"{ex['trained']} trained (in {how}) ---", text]
    lines += ["", "Token lengths before truncation   min  median     p95     max    mean"]
    names = {"prompt": "prompt (not trained)", "response": "response (trained)", "total": "total"}
    for key, label in names.items():
        s = report["lengths"][key]
        lines.append(f"  {label:<29}" + "".join(f"{_num(s[k]):>8}"
                                                for k in ("min", "median", "p95", "max", "mean")))
    t = report["truncation"]
    lines += ["", f"Truncation to cutoff_len={t['cutoff_len']}: {t['fit']} rows fit, {t['cut']} cut, "
                  f"{t['dropped']} dropped (no response token left); "
                  f"{t['trained_tokens_removed']} trained tokens lost"]
    p = report["padding"]
    multiple = p["pad_to_multiple_of"]
    rounding = f", rounded up to a multiple of {multiple}" if multiple > 1 else ""
    lines.append(f"Padding (shuffled batches of {p['batch_size']}, padded to the longest{rounding}): "
                 f"{p['without_packing']:.1%} without packing, {p['padding_free']:.1%} in padding-free batches "
                 f"(the default: the same examples per step), {p['with_packing']:.1%} with packing "
                 f"({p['packed_rows']} packed rows)")
    d = report.get("duplicates")
    if d is not None:
        dedup = f" ({d['dropped_by_dedup']} already dropped by dedup)" if d.get("dropped_by_dedup") else ""
        lines.append(f"Exact duplicates: {_n(d['rows'], 'row repeats', 'rows repeat')} an earlier row{dedup}")
    prep = report.get("preparation")
    if prep is not None:
        lines.append(f"Text preparation ({', '.join(prep['keys'])}): {prep['rows_changed']} of {prep['rows']} rows "
                     "changed" + (", e.g." if prep["examples"] else ""))
        for ex in prep["examples"]:
            lines += [f"  {ex['origin']}", f"    before: {ex['before']}", f"    after:  {ex['after']}"]
    aug = report.get("augmentation")
    if aug is not None:
        lines.append(f"Augmentation ({', '.join(aug['ops'])}): {aug['copies']} copies of the {aug['rows']} rows "
                     f"({aug['share']:.0%} of training rows before the split), e.g.")
        for ex in aug["examples"]:
            lines += [f"  {ex['origin']}", f"    row:    {ex['before']}", f"    copy:   {ex['after']}"]
    sp = report.get("splits")
    if sp is not None:
        fold = f" in each of {sp['folds']} folds (lathe cv)" if sp.get("folds") else ""
        lines.append(f"Splits of the {sp['rows']} rows: train {sp['train']}, eval {sp['eval']}{fold}, test {sp['test']}"
                     " (rows with nothing to train are dropped after this)")
    warnings = report.get("warnings") or []
    lines += ["", f"Warnings ({len(warnings)}):" if warnings else "No warnings."]
    lines += [f"  ! {w}" for w in warnings]
    return "\n".join(lines)


# --- the histogram ---------------------------------------------------------------------

def plot_lengths(prompt: Sequence[int], response: Sequence[int], cutoff_len: int,
                 path: str | Path, total: Sequence[int] | None = None) -> Path:
    """A PNG histogram of prompt and response token lengths, cutoff_len as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(prompt) + list(response) + list(total or []) + [cutoff_len]
    width = max(1, math.ceil((max(values) + 1) / 60))  # whole tokens per bar, at most ~60 bars
    edges = list(range(0, max(values) + 2 * width, width))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(prompt, bins=edges, color="#7f7f7f", alpha=0.6, label="prompt (not trained)")
    ax.hist(response, bins=edges, color="#2ca02c", alpha=0.6, label="response (trained)")
    if total is not None:
        ax.hist(total, bins=edges, histtype="step", color="#1f77b4", label="total")
    ax.axvline(cutoff_len, color="#d62728", linestyle="--", label=f"cutoff_len={cutoff_len}")
    ax.set_xlabel("tokens per row (before truncation)")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
