"""Task rows -> model inputs: the label set of a classification run, and its processor.

A classification run decides its label set once, over every training row (and checks the
eval rows against it), before anything is tokenized:
  single_label_classification  one class per row: a name ("positive"), or an id (3) into
                               `label_names`; names found in the data are sorted (numbers
                               by value, so "10" comes after "9")
  multi_label_classification   a list of classes per row (a CSV cell: names joined by commas)
  regression                   a number per row (MSE loss)
`problem_type: auto` picks multi-label for lists, regression when a label has decimals
(2.5, "0.75"), single-label otherwise. Every refusal names the file and row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lathe.errors import DataError

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"


@dataclass(frozen=True)
class LabelSet:
    problem_type: str
    names: tuple[str, ...]  # class names in id order (empty for regression)

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == REGRESSION else len(self.names)

    def config_keys(self) -> dict[str, Any]:
        """The resolved keys a run records in its config.yaml (so a repeat, predict and
        export rebuild the same head)."""
        if self.problem_type == REGRESSION:
            return {"problem_type": REGRESSION}
        if self.problem_type == TAGGING:  # problem_type is a cls key
            return {"label_names": list(self.names)}
        return {"problem_type": self.problem_type, "label_names": list(self.names)}

    def encode(self, raw: str, where: str) -> Any:
        """A row's label (as converted: JSON text) -> an id, a multi-hot list, or a float."""
        value = json.loads(raw)
        if self.problem_type == REGRESSION:
            return _number(value, where)
        index = self.index
        if self.problem_type == MULTI:
            hot = [0.0] * len(self.names)
            for item in _as_list(value):
                hot[_class_id(item, index, self.names, where)] = 1.0
            return hot
        if isinstance(value, list):
            raise DataError(f"{where}: label {value!r:.60} is a list, but problem_type is "
                            "single_label_classification; give one class per row")
        return _class_id(value, index, self.names, where)

    def decode(self, class_id: int) -> str:
        return self.names[class_id]

    @cached_property
    def index(self) -> dict[str, int]:
        """name -> id (computed once: encode runs for every row)."""
        return {n: i for i, n in enumerate(self.names)}


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, str):  # a CSV cell: "sports,politics"
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def _name(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _class_id(value: Any, index: dict[str, int], names: tuple[str, ...], where: str) -> int:
    name = _name(value)
    if name in index:
        return index[name]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value  # an id into label_names
    raise DataError(f"{where}: label {name!r} is not one of the {len(names)} classes "
                    f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); fix the row, or add "
                    "the class to label_names")


def _number(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool) or isinstance(value, list):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r:.60} is not a number, but problem_type is regression; "
                        "fix the row (a regression label is a number such as 3.5)") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: label {value!r} is not a finite number")
    return number


def _kind(value: Any) -> str:
    """What a label looks like: list, number (a JSON number), decimal (a number with a
    fraction, JSON or text), or text."""
    if isinstance(value, list):
        return "list"
    if isinstance(value, bool):
        return "text"
    if isinstance(value, float) and not value.is_integer():
        return "decimal"
    if isinstance(value, (int, float)):
        return "number"
    try:
        number = float(value)
    except ValueError:
        return "text"
    return "decimal" if math.isfinite(number) and not number.is_integer() and "." in value else "text"


def _first(rows: list[dict], kinds: list[str], kind: str) -> str:
    return rows[kinds.index(kind)]["origin"]


def resolve_labels(rows: list[dict], eval_rows: list[dict], problem_type: str = "auto",
                   label_names: list[str] | None = None, num_labels: int | None = None) -> LabelSet:
    """The run's label set from its training rows (see the module docstring), with the eval
    rows checked against it."""
    values = [json.loads(r["label"]) for r in rows]
    kinds = [_kind(v) for v in values]
    seen = set(kinds)
    if "list" in seen and len(seen) > 1:
        other = next(k for k in kinds if k != "list")
        raise DataError(f"the label column mixes lists and single labels: {_first(rows, kinds, 'list')} has a "
                        f"list, {_first(rows, kinds, other)} a single label; use one kind in every row")
    if {"text", "number"} <= seen and problem_type != REGRESSION and not label_names:
        raise DataError(f"the label column mixes types: {_first(rows, kinds, 'text')} has a name, "
                        f"{_first(rows, kinds, 'number')} a number; write every label as a class name "
                        "(or every one as an id into label_names)")
    if problem_type == "auto":
        problem_type = MULTI if "list" in seen else REGRESSION if "decimal" in seen and "text" not in seen \
            else SINGLE
    if problem_type == REGRESSION:
        for r, v in zip(rows, values):
            _number(v, r["origin"])
        for r in eval_rows:
            _number(json.loads(r["label"]), r["origin"])
        if num_labels not in (None, 1):
            raise DataError(f"num_labels={num_labels} with problem_type: regression; a regression head "
                            "has one output: remove num_labels")
        return LabelSet(REGRESSION, ())

    items = [(r, item) for r, v in zip(rows, values)
             for item in (_as_list(v) if problem_type == MULTI else [v])]
    if label_names:
        names = tuple(label_names)
    else:
        found = {_name(item) for _, item in items}
        all_ids = all(isinstance(item, int) and not isinstance(item, bool) for _, item in items)
        if all_ids:  # ids without names: classes 0..max (or num_labels)
            top = max(int(item) for _, item in items)
            if min(int(item) for _, item in items) < 0:
                bad = next(r for r, item in items if int(item) < 0)
                raise DataError(f"{bad['origin']}: label id {_name(next(i for _, i in items if int(i) < 0))} "
                                "is negative; class ids start at 0")
            names = tuple(str(i) for i in range(max(top + 1, num_labels or 0)))
        else:
            names = tuple(sorted(found, key=_sort_key))
    if num_labels is not None and num_labels != len(names):
        raise DataError(f"num_labels={num_labels} disagrees with the data: it has {len(names)} classes "
                        f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); drop num_labels or "
                        "give label_names")
    if len(names) < 2 and problem_type == SINGLE:
        raise DataError(f"the training rows have only one class ({names[0] if names else 'none'}); "
                        "a classifier needs at least two (or give label_names with every class)")
    labels = LabelSet(problem_type, names)
    for r, v in zip(rows, values):
        labels.encode(json.dumps(v), r["origin"])  # names outside label_names are reported here
    unseen = {} if label_names else _unseen(eval_rows, labels)
    if unseen:
        name, where = next(iter(unseen.items()))
        raise DataError(f"{where}: eval label {name!r} never appears in the training rows, so the model "
                        f"cannot predict it (training has: {', '.join(names[:8])}"
                        f"{', ...' if len(names) > 8 else ''}); fix the row, or list every class in label_names")
    for r in eval_rows:
        labels.encode(r["label"], r["origin"])
    return labels


def _unseen(eval_rows: list[dict], labels: LabelSet) -> dict[str, str]:
    known = set(labels.names)
    out: dict[str, str] = {}
    for r in eval_rows:
        value = json.loads(r["label"])
        for item in (_as_list(value) if labels.problem_type == MULTI else [value]):
            name = _name(item)
            ids_ok = isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(labels.names)
            if name not in known and not ids_ok:
                out.setdefault(name, r["origin"])
    return out


def _sort_key(name: str) -> tuple[int, float, str]:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


# --- processor ------------------------------------------------------------------------------

def make_cls_preprocess(tokenizer: Any, cutoff_len: int, labels: LabelSet):
    """Batched `datasets.map` function: text (+ text_pair) -> input ids (truncated to
    cutoff_len, the model's special tokens added), the encoded label, and the row's text and
    origin (for the predictions file). Token type ids only for models that read them (BERT:
    0 for text, 1 for text_pair; GPT-2 would add a token's embedding for them)."""
    types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        pairs = batch.get("text_pair") or [""] * len(batch["text"])
        out: dict[str, list] = {"input_ids": [], "token_type_ids": [], "labels": [], "text": [],
                                "text_pair": [], "origin": []}
        for text, pair, label, origin in zip(batch["text"], pairs, batch["label"], batch["origin"]):
            pair = pair or None
            enc = tokenizer(text, pair, truncation=True, max_length=cutoff_len, return_token_type_ids=types)
            out["input_ids"].append(enc["input_ids"])
            out["token_type_ids"].append(enc["token_type_ids"] if types else [])
            out["labels"].append(labels.encode(label, origin))
            out["text"].append(text)
            out["text_pair"].append(pair or "")
            out["origin"].append(origin)
        return out

    return preprocess


# --- tagging ----------------------------------------------------------------------------------

TAGGING = "token_classification"
_PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


def _tag_key(tag: str) -> tuple[int, str, int, str]:
    """O first, then by entity type, B- before I- (E-, S-) within a type."""
    if tag == "O":
        return (0, "", 0, tag)
    prefix, _, kind = tag.partition("-")
    if kind and prefix in _PREFIX_ORDER:
        return (1, kind, _PREFIX_ORDER[prefix], tag)
    return (1, tag, 9, tag)


def resolve_tags(rows: list[dict], eval_rows: list[dict], label_names: list[str] | None = None,
                 num_labels: int | None = None) -> LabelSet:
    """The tag set of a tagging run: label_names, or every tag in the training rows (ids into
    label_names, or names); eval tags the training rows never use are refused, naming the row."""
    found: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for r in rows:
        for tag in json.loads(r["tags"]):
            kind = "id" if isinstance(tag, int) else "name"
            kinds.setdefault(kind, r["origin"])
            found.setdefault(_name(tag), r["origin"])
    if len(kinds) > 1 and not label_names:
        raise DataError(f"the tags mix names and ids: {kinds['name']} has a tag name, {kinds['id']} an id; "
                        "write every tag as a name (B-PER, O, ...) or give label_names for the ids")
    if label_names:
        names = tuple(label_names)
    elif "id" in kinds:
        names = tuple(str(i) for i in range(max(max(int(t) for t in found) + 1, num_labels or 0)))
    else:
        names = tuple(sorted(found, key=_tag_key))
    if num_labels is not None and num_labels != len(names):
        raise DataError(f"num_labels={num_labels} disagrees with the data: it has {len(names)} tags "
                        f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); drop num_labels or "
                        "give label_names")
    tags = LabelSet(TAGGING, names)
    index = tags.index
    for r in rows:
        for tag in json.loads(r["tags"]):
            _class_id(tag, index, names, r["origin"])
    for r in eval_rows:
        for tag in json.loads(r["tags"]):
            if not label_names and _name(tag) not in index and not isinstance(tag, int):
                raise DataError(f"{r['origin']}: eval tag {_name(tag)!r} never appears in the training rows, so "
                                f"the model cannot predict it (training has: {', '.join(names[:10])}"
                                f"{', ...' if len(names) > 10 else ''}); fix the row, or list every tag in label_names")
            _class_id(tag, index, names, r["origin"])
    return tags


def inside_tag(names: tuple[str, ...]) -> list[int]:
    """For each tag id: the id later pieces of a word get with label_all_tokens (B-X -> I-X
    where the set has I-X; the tag itself otherwise)."""
    index = {n: i for i, n in enumerate(names)}
    return [index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]


def make_tagging_preprocess(tokenizer: Any, cutoff_len: int, tags: LabelSet, label_all_tokens: bool = False):
    """Batched map function: words -> pieces (the tokenizer's own split of each word, special
    tokens added), each word's tag on its first piece and IGNORE_INDEX on the rest (or the
    inside tag with label_all_tokens) and on special tokens; `word_ids` keeps which word each
    piece came from (-1: special), for word-level scores and predictions."""
    from lathe.data.processors import IGNORE_INDEX

    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"stage tagging needs a fast tokenizer (it maps pieces back to words); "
                        f"{type(tokenizer).__name__} is not one: install `tokenizers` or convert the tokenizer")
    types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    inside = inside_tag(tags.names)
    index = tags.index

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "token_type_ids": [], "labels": [], "word_ids": [],
                                "tokens": [], "origin": []}
        for words, raw, origin in zip(batch["tokens"], batch["tags"], batch["origin"]):
            ids = [_class_id(t, index, tags.names, origin) for t in json.loads(raw)]
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=cutoff_len,
                            return_token_type_ids=types)
            word_ids = [-1 if w is None else w for w in enc.word_ids()]
            labels, previous = [], -1
            for w in word_ids:
                if w < 0:
                    labels.append(IGNORE_INDEX)
                elif w != previous:
                    labels.append(ids[w])
                else:
                    labels.append(inside[ids[w]] if label_all_tokens else IGNORE_INDEX)
                previous = w
            out["input_ids"].append(enc["input_ids"])
            out["token_type_ids"].append(enc["token_type_ids"] if types else [])
            out["labels"].append(labels)
            out["word_ids"].append(word_ids)
            out["tokens"].append(words)
            out["origin"].append(origin)
        return out

    return preprocess


# --- seq2seq ----------------------------------------------------------------------------------

def make_seq2seq_preprocess(tokenizer: Any, cutoff_len: int, max_target_length: int, prefix: str | None = None):
    """Batched map function: the source (after `prefix`) -> input ids (at most cutoff_len),
    the target -> labels (at most max_target_length; the tokenizer's end token kept last, so
    the model learns where to stop)."""

    def ids(texts: list[str], limit: int) -> list[list[int]]:
        return list(tokenizer(texts, truncation=True, max_length=limit)["input_ids"])

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        sources = [(prefix or "") + s for s in batch["source"]]
        return {"input_ids": ids(sources, cutoff_len), "labels": ids(batch["target"], max_target_length),
                "source": batch["source"], "target": batch["target"], "origin": batch["origin"]}

    return preprocess


# --- extractive question answering ---------------------------------------------------------------

def make_qa_preprocess(tokenizer: Any, cutoff_len: int, doc_stride: int):
    """Batched map function: (question, context) -> one feature per window of the context
    (windows of cutoff_len tokens overlapping by doc_stride, the question in each). A feature
    keeps each token's character span in the context (offsets; [-1, -1] outside it) and the
    token positions of the first answer (start_positions / end_positions), or 0 (the first
    token, standing for "no answer") where the answer is not inside this window."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"stage qa needs a fast tokenizer (it maps answer characters to tokens); "
                        f"{type(tokenizer).__name__} is not one")
    types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["question"], batch["context"], truncation="only_second", max_length=cutoff_len,
                        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                        return_token_type_ids=types)
        out: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "start_positions", "end_positions",
                                                "offsets", "context", "question", "answers", "origin")}
        for i, offsets in enumerate(enc["offset_mapping"]):
            ex = enc["overflow_to_sample_mapping"][i]
            sequence = enc.sequence_ids(i)
            spans = [list(o) if sequence[k] == 1 else [-1, -1] for k, o in enumerate(offsets)]
            inside = [k for k, s in enumerate(sequence) if s == 1]
            start = end = 0
            answers = json.loads(batch["answers"][ex])
            if answers and inside:
                text, first_char = answers[0]
                last_char = first_char + len(text)
                if spans[inside[0]][0] <= first_char and spans[inside[-1]][1] >= last_char:
                    start = next(k for k in inside if spans[k][1] > first_char)
                    end = next(k for k in reversed(inside) if spans[k][0] < last_char)
            out["input_ids"].append(enc["input_ids"][i])
            out["token_type_ids"].append(enc["token_type_ids"][i] if types else [])
            out["start_positions"].append(start)
            out["end_positions"].append(end)
            out["offsets"].append(spans)
            for key in ("context", "question", "answers", "origin"):
                out[key].append(batch[key][ex])
        return out

    return preprocess


# --- sentence embeddings --------------------------------------------------------------------------

def check_pairs(rows: list[dict]) -> str:
    """What the pairs train with: "score" (every row has a similarity score: cosine loss) or
    "contrastive" (none has: in-batch negatives, plus the hard negatives given)."""
    scored = [r for r in rows if r["score"] is not None]
    if scored and len(scored) != len(rows):
        bare = next(r for r in rows if r["score"] is None)
        raise DataError(f"{bare['origin']} has no score but {scored[0]['origin']} has one; give every pair a "
                        "score (cosine loss) or none (contrastive loss)")
    if scored and any(r["negative"] for r in rows):
        raise DataError(f"{next(r for r in rows if r['negative'])['origin']}: a hard negative with scored pairs; "
                        "scored pairs train a cosine loss, which has no use for negatives: drop one of them")
    return "score" if scored else "contrastive"


def make_embed_preprocess(tokenizer: Any, cutoff_len: int):
    """Batched map function: anchor, positive and (maybe empty) negative texts -> their ids."""
    def ids(texts: list[str]) -> list[list[int]]:
        return list(tokenizer(texts, truncation=True, max_length=cutoff_len)["input_ids"])

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        negatives = [n or "" for n in batch["negative"]]
        encoded = ids([n or "-" for n in negatives])
        return {"input_ids": ids(batch["anchor"]), "positive_ids": ids(batch["positive"]),
                "negative_ids": [e if n else [] for e, n in zip(encoded, negatives)],
                "score": [s if s is not None else float("nan") for s in batch["score"]],
                "anchor": batch["anchor"], "positive": batch["positive"], "origin": batch["origin"]}

    return preprocess
