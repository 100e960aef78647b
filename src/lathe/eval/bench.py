"""`lathe eval`: multiple-choice benchmarks (MMLU / C-Eval / CMMLU layout) scored by letter logits.

Each question is rendered with the SAME chat template as training: a system text naming
the subject, the first `n_shot` dev rows of the subject as earlier user/assistant turns
(user: question + the four options + "Answer:", assistant: the letter), then the
question and the assistant header. The model's answer is the letter whose token has
the highest logit at the last prompt position; no text is generated.

Which token is "the letter"? The one the template writes a reply with. Rendering a reply
"A", "B", "C" and "D" after the same prompt gives four token sequences; their common
beginning (e.g. a thinking block some templates open every reply with) is appended to
the prompt, and the first token where they differ is each letter's token. So `default`
(reply " {content}") compares " A"... and `chatml` (reply "{content}") compares "A"...,
exactly the tokens a fine-tuned model learned to emit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lathe.config.schema import LatheConfig
from lathe.data.conversation import Conversation, Message
from lathe.errors import ModelError, OutputError
from lathe.eval.bench_data import LETTERS, Benchmark, Question, Subject, load_benchmark

SYSTEM = {
    "en": "The following are multiple choice questions (with answers) about {subject}.",
    "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。",
}
ANSWER_CUE = {"en": "Answer:", "zh": "答案："}
SHOW_SUBJECTS_UP_TO = 20  # the printed table lists subjects when there are this few


def run_benchmark(cfg: LatheConfig, per_subject: bool | None = None) -> dict:
    """Score the model of `cfg` on `cfg.bench.task`; print a table, write results.json.

    `per_subject`: print a row per subject too (None: when there are at most 20)."""
    from lathe.data.templates import get_template
    from lathe.model.load import load_for_inference

    b = cfg.bench
    bench = load_benchmark(b.task, b.task_dir, b.n_shot)  # a bad folder fails before the model loads
    out = check_save_dir(b.save_dir)
    template = get_template(cfg.data.template)
    model, tokenizer, _ = load_for_inference(cfg)
    model = _to_accelerator(model)
    prompter = Prompter.build(template, tokenizer, b.lang, cfg.data.cutoff_len)
    print(f"{bench.name} {bench.split}: {len(bench.subjects)} subjects, {bench.total} questions, "
          f"{b.n_shot}-shot, template {cfg.data.template}; choices are the tokens "
          f"{' '.join(repr(tokenizer.decode([t])) for t in prompter.choice_ids)}", flush=True)
    if not prompter.choices.exact:
        print(f"note: with this tokenizer the template's replies A, B, C, D do not each start with a token of "
              f"their own; the prompt ends with {tokenizer.decode(prompter.lead)!r} and the bare letters are compared",
              flush=True)
    started = time.time()
    picks = {s.key: score_subject(model, prompter, s, cfg.train.per_device_eval_batch_size)
             for s in bench.subjects}
    results = summarize(bench, picks)
    results.update(task=b.task, n_shot=b.n_shot, lang=b.lang, model=cfg.model.model_name_or_path,
                   adapters=list(cfg.model.adapter_name_or_path or []), template=cfg.data.template,
                   cutoff_len=cfg.data.cutoff_len, prompts=prompter.stats.as_dict(),
                   seconds=round(time.time() - started, 2))
    show = per_subject if per_subject is not None else len(bench.subjects) <= SHOW_SUBJECTS_UP_TO
    print(format_table(results, show), flush=True)
    if prompter.stats.shots_dropped or prompter.stats.cut:
        print(prompter.stats.note(cfg.data.cutoff_len), flush=True)
    if out is None:
        print("save_dir is not set: results are printed only (set save_dir to keep results.json)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        print(f"Results: {out / 'results.json'}")
    return results


def check_save_dir(save_dir: str | None) -> Path | None:
    """save_dir must not exist or be empty: results of two runs never mix."""
    if not save_dir:
        return None
    out = Path(save_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"save_dir {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise OutputError(f"save_dir {out} already holds files ({held}); choose another save_dir or empty it")
    return out


def _to_accelerator(model: Any) -> Any:
    import torch

    if torch.cuda.is_available() and model.device.type == "cpu":
        return model.to("cuda")
    return model


# --- prompts ------------------------------------------------------------------------------

def format_question(q: Question, lang: str = "en") -> str:
    """The user turn: question, the four options, and the answer cue."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return f"{q.question}{options}\n{ANSWER_CUE[lang]}"


def system_text(subject: Subject, lang: str = "en") -> str:
    return SYSTEM[lang].format(subject=subject.name)


@dataclass
class PromptStats:
    prompts: int = 0
    shots_dropped: int = 0  # few-shot turns left out to fit cutoff_len
    cut: int = 0  # prompts still too long without any shot, cut from the left

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "shots_dropped": self.shots_dropped, "cut": self.cut}

    def note(self, cutoff_len: int) -> str:
        return (f"note: to fit cutoff_len {cutoff_len}, {self.shots_dropped} few-shot examples were left out"
                f" and {self.cut} of {self.prompts} prompts were cut from the left; raise cutoff_len "
                "(up to the model's context) or lower n_shot")


@dataclass
class Prompter:
    """Token ids of each question's prompt, and the token of each choice letter."""

    template: Any
    tokenizer: Any
    lang: str
    cutoff_len: int
    choices: Choices
    stats: PromptStats

    @classmethod
    def build(cls, template: Any, tokenizer: Any, lang: str, cutoff_len: int) -> Prompter:
        return cls(template, tokenizer, lang, cutoff_len, choice_tokens(template, tokenizer, lang), PromptStats())

    @property
    def lead(self) -> list[int]:
        return self.choices.lead

    @property
    def choice_ids(self) -> list[int]:
        return self.choices.ids

    def prompt_ids(self, subject: Subject, q: Question) -> list[int]:
        """Prompt with as many of the subject's shots as fit in cutoff_len (earliest dropped first)."""
        self.stats.prompts += 1
        system = system_text(subject, self.lang)
        query = format_question(q, self.lang)
        for k in range(len(subject.shots), -1, -1):
            shots = subject.shots[len(subject.shots) - k:]
            ids, reply = render(self.template, self.tokenizer, shots, query, system, self.lang)
            if self.choices.exact and reply[:len(self.lead) + 1] != self.lead + self.choice_ids[:1]:
                raise ModelError(f"{q.where}: template {self.template.name} renders this reply differently "
                                 "from the others; the choice tokens cannot be compared")
            ids = ids + self.lead
            if len(ids) <= self.cutoff_len:
                self.stats.shots_dropped += len(subject.shots) - k
                return ids
        self.stats.shots_dropped += len(subject.shots)
        self.stats.cut += 1
        return ids[-self.cutoff_len:]


def render(template: Any, tokenizer: Any, shots: list[Question], query: str, system: str,
           lang: str, letter: str = "A") -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a conversation: the shots as earlier turns, then `query`
    answered with `letter`; tokenized in one pass, exactly as training tokenizes."""
    msgs: list[Message] = []
    for shot in shots:
        msgs += [Message("user", format_question(shot, lang)), Message("assistant", shot.answer)]
    msgs += [Message("user", query), Message("assistant", letter)]
    turns = template.encode_turns(Conversation(tuple(msgs), system=system), tokenizer)
    prompt = [t for p, r in turns[:-1] for t in p + r] + list(turns[-1][0])
    return prompt, list(turns[-1][1])


class Choices(NamedTuple):
    lead: list[int]  # reply tokens before the letter, appended to every prompt
    ids: list[int]  # the token of A, B, C, D
    exact: bool  # True: the very tokens the template's replies start with


def choice_tokens(template: Any, tokenizer: Any, lang: str = "en") -> Choices:
    """The tokens whose logits are compared.

    Exact: the replies "A".."D" rendered by the template share `lead` tokens, then differ
    in one token each (" A" after "Assistant:" in `default`, "A" in `chatml`).
    Fallback, for a small vocabulary where e.g. " A" is one token but " B" two: the reply
    text before the letter (" ") is tokenized alone into `lead` and the bare letters are
    compared; `run_benchmark` says so."""
    probe = Question("1 + 1 = ?", ("1", "2", "3", "4"), "B")
    system = SYSTEM[lang].format(subject="arithmetic")
    replies = [render(template, tokenizer, [], format_question(probe, lang), system, lang, letter)[1]
               for letter in LETTERS]
    n = 0
    while all(len(r) > n for r in replies) and len({r[n] for r in replies}) == 1:
        n += 1
    ids = [r[n] if len(r) > n else -1 for r in replies]
    if _distinct_letters(tokenizer, ids):
        return Choices(replies[0][:n], ids, True)
    texts = [tokenizer.decode(r) for r in replies]
    leads = {t[:t.find(letter)] for t, letter in zip(texts, LETTERS) if letter in t}
    if len(leads) == 1:
        lead = tokenizer.encode(leads.pop(), add_special_tokens=False)
        bare = [tokenizer.encode(letter, add_special_tokens=False) for letter in LETTERS]
        ids = [b[0] if len(b) == 1 else -1 for b in bare]
        if _distinct_letters(tokenizer, ids):
            return Choices(lead, ids, False)
    shown = [tokenizer.convert_ids_to_tokens(r) for r in replies]
    raise ModelError(f"template {template.name}: the replies A, B, C, D tokenize as {shown}, which do not "
                     "start with one distinct token per letter; choose the model's own template")


def _distinct_letters(tokenizer: Any, ids: list[int]) -> bool:
    """One token per letter, all different, each showing its letter."""
    return -1 not in ids and len(set(ids)) == len(LETTERS) and all(
        letter in tokenizer.decode([t]) for letter, t in zip(LETTERS, ids))


# --- scoring ------------------------------------------------------------------------------

def score_subject(model: Any, prompter: Prompter, subject: Subject, batch_size: int) -> list[str]:
    """The letter picked for each question of `subject`, in file order."""
    from tqdm.auto import tqdm

    prompts = [prompter.prompt_ids(subject, q) for q in subject.questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: less padding
    picks: list[str] = [""] * len(prompts)
    pad = prompter.tokenizer.pad_token_id
    with tqdm(total=len(prompts), desc=subject.key, unit="q", leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            logits = choice_logits(model, [prompts[i] for i in chunk], prompter.choice_ids, pad)
            for i, best in zip(chunk, logits.argmax(-1).tolist()):
                picks[i] = LETTERS[best]
            bar.update(len(chunk))
    return picks


def choice_logits(model: Any, prompts: list[list[int]], choice_ids: list[int], pad_id: int) -> Any:
    """Logits of the choice tokens at each prompt's last position: one forward, left padding.

    Position ids count real tokens only, so a padded prompt scores as it would alone."""
    import inspect

    import torch

    from lathe.infer import left_pad

    ids, mask = left_pad(prompts, pad_id, model.device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    accepted = inspect.signature(model.forward).parameters
    if "position_ids" in accepted:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad():
        out = model(**kwargs, use_cache=False)
    return out.logits[:, -1, choice_ids].float().cpu()


# --- results ------------------------------------------------------------------------------

def _score(correct: int, total: int) -> dict:
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def summarize(bench: Benchmark, picks: dict[str, list[str]]) -> dict:
    """Accuracy per subject, per category and on average (over all questions, so a
    category or the average weighs each question alike, as MMLU reports do)."""
    subjects, categories = {}, {}
    predicted = dict.fromkeys(LETTERS, 0)
    for s in bench.subjects:
        chosen = picks[s.key]
        correct = sum(p == q.answer for p, q in zip(chosen, s.questions))
        subjects[s.key] = {"name": s.name, "category": s.category, **_score(correct, len(s.questions))}
        c = categories.setdefault(s.category, [0, 0])
        c[0] += correct
        c[1] += len(s.questions)
        for p in chosen:
            predicted[p] += 1
    total = sum(c[1] for c in categories.values())
    return {
        "benchmark": bench.name,
        "split": bench.split,
        "subjects": subjects,
        "categories": {k: _score(*v) for k, v in sorted(categories.items())},
        "average": _score(sum(c[0] for c in categories.values()), total),
        "predicted": predicted,
    }


def format_table(results: dict, per_subject: bool) -> str:
    """Accuracy (%) per category and the average; per subject too when asked."""
    def line(name: str, r: dict) -> str:
        return f"{name[:32]:<32} {100 * r['accuracy']:>8.2f} {r['correct']:>7d} {r['total']:>7d}"

    rows = [f"{'category':<32} {'accuracy':>8} {'correct':>7} {'total':>7}"]
    rows += [line(name, r) for name, r in results["categories"].items()]
    rows.append(line("Average", results["average"]))
    if per_subject:
        rows += ["", f"{'subject':<32} {'accuracy':>8} {'correct':>7} {'total':>7}"]
        rows += [line(key, r) for key, r in sorted(results["subjects"].items())]
    return "\n".join(rows)
