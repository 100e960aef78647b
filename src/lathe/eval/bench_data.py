"""Multiple-choice benchmark folders (MMLU / C-Eval / CMMLU layout) read into questions.

A benchmark is a folder under `task_dir` with one sub-folder per split (dev, val, test)
holding one CSV per subject:

- MMLU: `<split>/<subject>_<split>.csv`, no header, columns question,A,B,C,D,answer;
- C-Eval: `<split>/<subject>_<split>.csv` with a header id,question,A,B,C,D,answer[,explanation];
- CMMLU: `<split>/<subject>.csv` with a header ,Question,A,B,C,D,Answer.

The layout is told from each file itself: a first row whose cells name question, A, B,
C and D (any case) is a header, and columns are then found by name. An optional
`mapping.json` ({subject: {"name": ..., "category": ...}}) gives display names and
categories. Pure Python: no torch, so a bad folder fails before any model loads.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from lathe.errors import DataError

LETTERS = ("A", "B", "C", "D")
OTHER = "other"  # category of a subject that mapping.json does not list


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]  # the texts of A, B, C, D
    answer: str  # "A".."D"
    where: str = ""  # "file row N", for messages


@dataclass(frozen=True)
class Subject:
    key: str  # file stem without the split suffix (mapping.json's key)
    name: str  # how the prompt names it
    category: str
    questions: list[Question]
    shots: list[Question] = field(default_factory=list)  # first n_shot rows of the dev split
    layout: str = "mmlu"  # mmlu (no header) or header


@dataclass(frozen=True)
class Benchmark:
    name: str
    split: str
    folder: Path
    subjects: list[Subject]

    @property
    def total(self) -> int:
        return sum(len(s.questions) for s in self.subjects)


def load_benchmark(task: str, task_dir: str, n_shot: int) -> Benchmark:
    """Resolve `task` under `task_dir` and read every subject of its split (plus few-shot rows)."""
    folder, split = resolve_task(task, task_dir)
    split_dir = _split_dir(folder, split)
    files = sorted(split_dir.glob("*.csv"))
    if not files:
        raise DataError(f"{split_dir} holds no .csv files; put one <subject>_{split}.csv per subject there")
    mapping = read_mapping(folder / "mapping.json")
    dev_dir = folder / "dev"
    if n_shot > 0 and not dev_dir.is_dir():
        raise DataError(f"{folder} has no dev split folder for the few-shot examples (n_shot: {n_shot}); "
                        f"add {dev_dir} or set n_shot: 0")
    subjects = []
    for path in files:
        key = subject_key(path, split)
        questions, layout = read_questions(path)
        shots = read_questions(dev_file(dev_dir, key, n_shot))[0][:n_shot] if n_shot > 0 else []
        info = mapping.get(key, {})
        subjects.append(Subject(key=key, name=info.get("name") or key.replace("_", " "),
                                category=info.get("category") or OTHER, questions=questions,
                                shots=shots, layout=layout))
    return Benchmark(name=folder.name, split=split, folder=folder, subjects=subjects)


def resolve_task(task: str, task_dir: str) -> tuple[Path, str]:
    """`mmlu_test` -> (task_dir/mmlu, "test"); a name that is a folder as is -> split "test"."""
    root = Path(task_dir)
    if not root.is_dir():
        raise DataError(f"task_dir {task_dir} does not exist (relative to {Path.cwd()}); "
                        "set task_dir to the folder that holds the benchmark folders")
    if (root / task).is_dir():
        return root / task, "test"
    name, _, split = task.rpartition("_")
    if name and split and (root / name).is_dir():
        return root / name, split
    held = sorted(p.name for p in root.iterdir() if p.is_dir())
    wanted = root / (name or task)
    raise DataError(f"task {task}: no benchmark folder {wanted} (task_dir {task_dir} holds: "
                    f"{', '.join(held) or 'no folders'}); task is <folder>_<split>, e.g. "
                    f"{(held or ['mmlu'])[0]}_test")


def _split_dir(folder: Path, split: str) -> Path:
    split_dir = folder / split
    if not split_dir.is_dir():
        held = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise DataError(f"{folder} has no {split} split folder (it has: {', '.join(held) or 'no folders'}); "
                        f"set task: {folder.name}_<split> with one of them")
    return split_dir


def subject_key(path: Path, split: str) -> str:
    """`abstract_algebra_test.csv` -> abstract_algebra (MMLU, C-Eval); `agronomy.csv` -> agronomy (CMMLU)."""
    stem = path.stem
    suffix = f"_{split}"
    return stem[: -len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else stem


def dev_file(dev_dir: Path, key: str, n_shot: int) -> Path:
    for candidate in (dev_dir / f"{key}_dev.csv", dev_dir / f"{key}.csv"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{dev_dir} has no {key}_dev.csv (or {key}.csv) for the few-shot examples of "
                    f"{key} (n_shot: {n_shot}); add it or set n_shot: 0")


def read_mapping(path: Path) -> dict[str, dict]:
    """mapping.json, or {} when the benchmark has none."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f'{path}: expected {{subject: {{"name": ..., "category": ...}}}}')
    for key, info in data.items():
        if not isinstance(info, dict) or not all(isinstance(info.get(k, ""), str) for k in ("name", "category")):
            raise DataError(f'{path}: entry {key!r} must be {{"name": "...", "category": "..."}}')
    return data


# --- one CSV file ---------------------------------------------------------------------

def read_questions(path: Path) -> tuple[list[Question], str]:
    """The questions of one subject file and its layout ("mmlu" or "header").

    Rows are counted as a spreadsheet shows them: the first record is row 1 (a header
    included); a quoted cell may span several lines and is still one row.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            rows = list(csv.reader(f))
        except csv.Error as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise DataError(f"{path} is empty")
    columns = header_columns(rows[0], path)
    body = rows[1:] if columns else rows
    first = 2 if columns else 1
    width = len(rows[0]) if columns else 6
    shape = f"like the header {','.join(rows[0])}" if columns else "question, A, B, C, D, answer"
    columns = columns or {"question": 0, "A": 1, "B": 2, "C": 3, "D": 4, "answer": 5}
    questions = [_question(row, columns, (width, shape), path, n)
                 for n, row in enumerate(body, start=first) if row]  # a blank line is no row
    if not questions:
        raise DataError(f"{path} has no question rows")
    return questions, "header" if first == 2 else "mmlu"


def header_columns(row: list[str], path: Path) -> dict[str, int] | None:
    """{field: column} when `row` is a header (C-Eval, CMMLU), None for MMLU's headerless files."""
    names = [c.strip().lower() for c in row]
    if not ("question" in names and all(x.lower() in names for x in LETTERS)):
        return None
    if "answer" not in names:
        raise DataError(f"{path} row 1: the header ({','.join(row)}) has no answer column; "
                        "C-Eval's test split ships without answers, evaluate its val split instead "
                        "(task: ceval_val)")
    return {"question": names.index("question"), "answer": names.index("answer"),
            **{x: names.index(x.lower()) for x in LETTERS}}


def _question(row: list[str], columns: dict[str, int], shape: tuple[int, str], path: Path,
              n: int) -> Question:
    width, described = shape
    if len(row) != width:
        raise DataError(f"{path} row {n}: {len(row)} columns, expected {width} ({described})")
    question = row[columns["question"]].strip()
    if not question:
        raise DataError(f"{path} row {n}: the question is empty")
    answer = row[columns["answer"]].strip()
    if answer not in LETTERS:
        raise DataError(f"{path} row {n}: answer {answer!r} is not one of {', '.join(LETTERS)}")
    return Question(question=question, choices=tuple(row[columns[x]].strip() for x in LETTERS),
                    answer=answer, where=f"{path} row {n}")
