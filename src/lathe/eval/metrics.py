"""Metrics for predictions: classic ones for labels and numbers, BLEU-4 and ROUGE for text.

Pure Python on purpose: no sklearn, nltk or rouge packages at runtime, only jieba to cut
Chinese text into words. The tests prove that every value equals what scikit-learn, nltk's
`sentence_bleu` (NIST smoothing) and the `rouge-score` package give on the same tokens.
Tokens follow LLaMA-Factory's habit: BLEU-4 counts characters of Chinese text, ROUGE
counts jieba words; English text is split on spaces for both.

Empty inputs and length mismatches raise ValueError: a metric over nothing has no value,
and a silent zip() would score the wrong pairs.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from functools import cache
from typing import Any

# --------------------------------------------------------------------------- classic


def _check_pair(preds: Sequence, labels: Sequence) -> None:
    if len(preds) != len(labels):
        raise ValueError(
            f"predictions and labels differ in length ({len(preds)} vs {len(labels)}): "
            "each prediction needs exactly one label"
        )
    if len(preds) == 0:
        raise ValueError("predictions and labels are empty: there is nothing to score")


def accuracy(preds: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their label."""
    _check_pair(preds, labels)
    return sum(bool(p == y) for p, y in zip(preds, labels)) / len(labels)


def _safe_div(num: float, den: float) -> float:
    """num / den, or 0 when den is 0 (scikit-learn's zero_division=0)."""
    return num / den if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _safe_div(2 * precision * recall, precision + recall)


def precision_recall_f1(
    preds: Sequence[Hashable], labels: Sequence[Hashable], average: str = "macro"
) -> dict[str, float]:
    """Precision, recall and F1 of single-label classification.

    macro: the unweighted mean over every class seen in labels or preds, so rare classes
    count as much as common ones; F1 is the mean of per-class F1s. A class never predicted
    has precision 0, a class never in labels recall 0 (scikit-learn's zero_division=0).
    micro: pooled counts over all rows (equal to accuracy for single-label data).
    Labels may be of any hashable type: classes are never sorted.
    """
    _check_pair(preds, labels)
    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'macro' or 'micro', not {average!r}")
    true_pos: Counter = Counter(p for p, y in zip(preds, labels) if p == y)
    predicted, actual = Counter(preds), Counter(labels)
    if average == "micro":
        tp = sum(true_pos.values())
        precision = _safe_div(tp, sum(predicted.values()))
        recall = _safe_div(tp, sum(actual.values()))
        return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}
    classes = list(dict.fromkeys([*labels, *preds]))
    per_class = []
    for cls in classes:
        precision = _safe_div(true_pos[cls], predicted[cls])
        recall = _safe_div(true_pos[cls], actual[cls])
        per_class.append((precision, recall, _f1(precision, recall)))
    return {
        name: math.fsum(row[i] for row in per_class) / len(classes)
        for i, name in enumerate(("precision", "recall", "f1"))
    }


def mse(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Mean squared error."""
    _check_pair(preds, labels)
    return math.fsum((float(p) - float(y)) ** 2 for p, y in zip(preds, labels)) / len(labels)


def mae(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Mean absolute error."""
    _check_pair(preds, labels)
    return math.fsum(abs(float(p) - float(y)) for p, y in zip(preds, labels)) / len(labels)


def r2(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Coefficient of determination: 1 - SS_res / SS_tot (scikit-learn's r2_score; 0 when
    the labels are all equal and the predictions exact, -inf never: 0.0 then too)."""
    _check_pair(preds, labels)
    mean = math.fsum(float(y) for y in labels) / len(labels)
    ss_res = math.fsum((float(y) - float(p)) ** 2 for p, y in zip(preds, labels))
    ss_tot = math.fsum((float(y) - mean) ** 2 for y in labels)
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot


def confusion_matrix(preds: Sequence[int], labels: Sequence[int], n: int) -> list[list[int]]:
    """counts[true][predicted] over classes 0..n-1 (rows: the label, columns: the prediction)."""
    _check_pair(preds, labels)
    counts = [[0] * n for _ in range(n)]
    for p, y in zip(preds, labels):
        counts[int(y)][int(p)] += 1
    return counts


def classification_scores(preds: Sequence[Hashable], labels: Sequence[Hashable]) -> dict[str, float]:
    """accuracy, and precision / recall / F1, macro and micro (single-label classification)."""
    out = {"accuracy": accuracy(preds, labels)}
    for average in ("macro", "micro"):
        out.update({f"{k}_{average}": v for k, v in precision_recall_f1(preds, labels, average).items()})
    return out


def per_class_scores(preds: Sequence[int], labels: Sequence[int], names: Sequence[str]) -> dict[str, dict]:
    """For each class name: precision, recall, F1 and support (rows with that label)."""
    _check_pair(preds, labels)
    out = {}
    for i, name in enumerate(names):
        tp = sum(1 for p, y in zip(preds, labels) if p == y == i)
        predicted = sum(1 for p in preds if p == i)
        support = sum(1 for y in labels if y == i)
        precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
        out[name] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "support": support}
    return out


def multilabel_scores(preds: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """Multi-hot rows (0/1 per class): exact-match accuracy (every class right), and
    precision / recall / F1 micro (pooled over all class decisions) and macro (mean over
    classes), as scikit-learn computes them for multilabel indicators."""
    _check_pair(preds, labels)
    n = len(labels[0])
    tp = [0] * n
    pp = [0] * n
    ap = [0] * n
    for p, y in zip(preds, labels):
        for j in range(n):
            tp[j] += int(p[j] and y[j])
            pp[j] += int(p[j])
            ap[j] += int(y[j])
    out = {"accuracy": sum(list(map(int, p)) == list(map(int, y)) for p, y in zip(preds, labels)) / len(labels)}
    precision, recall = _safe_div(sum(tp), sum(pp)), _safe_div(sum(tp), sum(ap))
    out.update(precision_micro=precision, recall_micro=recall, f1_micro=_f1(precision, recall))
    per = [(_safe_div(tp[j], pp[j]), _safe_div(tp[j], ap[j])) for j in range(n)]
    out.update(precision_macro=math.fsum(p for p, _ in per) / n, recall_macro=math.fsum(r for _, r in per) / n,
               f1_macro=math.fsum(_f1(p, r) for p, r in per) / n)
    return out


def regression_scores(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """mse, rmse, mae and r2."""
    m = mse(preds, labels)
    return {"mse": m, "rmse": math.sqrt(m), "mae": mae(preds, labels), "r2": r2(preds, labels)}


# --------------------------------------------------------------------------- entities

def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a bare 'PER' counts as inside ('I', 'PER')."""
    if tag == "O" or not tag:
        return "O", ""
    head, sep, kind = tag.partition("-")
    if sep and head in ("B", "I", "E", "S"):
        return head, kind
    return "I", tag


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entity spans of one tagged sentence as (type, first, last) word indices, read the
    way CoNLL's conlleval reads them, so IOB1, IOB2 (BIO) and IOBES tags all work: an entity
    begins at B- or S-, or where an I-/E- tag follows O or a tag of another type (or one
    that closed its entity: E-, S-); it ends before a B-, S- or O, at E- or S-, or where the
    type changes."""
    spans: list[tuple[str, int, int]] = []
    open_kind, open_at = "", -1
    for i, tag in enumerate([*tags, "O"]):  # a final O closes whatever is open
        prefix, kind = _split_tag(tag)
        if open_kind and (prefix in ("B", "S", "O") or kind != open_kind):
            spans.append((open_kind, open_at, i - 1))
            open_kind = ""
        if prefix != "O" and not open_kind:
            open_kind, open_at = kind, i
        if prefix in ("E", "S") and open_kind:
            spans.append((open_kind, open_at, i))
            open_kind = ""
    return spans


def entity_scores(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (exact span and type match, pooled over all
    sentences: CoNLL's micro average), macro F1 over entity types, per-type scores, and the
    accuracy of the word tags."""
    _check_pair(predicted, gold)
    found: Counter = Counter()
    wanted: Counter = Counter()
    hit: Counter = Counter()
    right = words = 0
    for i, (p, y) in enumerate(zip(predicted, gold)):
        if len(p) != len(y):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(y)} words")
        ps, ys = set(entities(p)), set(entities(y))
        found.update(k for k, _, _ in ps)
        wanted.update(k for k, _, _ in ys)
        hit.update(k for k, _, _ in ps & ys)
        right += sum(a == b for a, b in zip(p, y))
        words += len(y)
    kinds = sorted(set(found) | set(wanted))
    per_type = {}
    for k in kinds:
        precision, recall = _safe_div(hit[k], found[k]), _safe_div(hit[k], wanted[k])
        per_type[k] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "support": wanted[k]}
    precision = _safe_div(sum(hit.values()), sum(found.values()))
    recall = _safe_div(sum(hit.values()), sum(wanted.values()))
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "f1_macro": math.fsum(v["f1"] for v in per_type.values()) / len(kinds) if kinds else 0.0,
            "accuracy": _safe_div(right, words), "per_type": per_type}


# --------------------------------------------------------------------------- extractive QA

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no English articles, single spaces."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answer_tokens(text: str) -> list[str]:
    norm = normalize_answer(text)
    return list(norm.replace(" ", "")) if has_cjk(norm) else norm.split()


def answer_f1(prediction: str, gold: str) -> float:
    """Token overlap F1 of two answers (characters for Chinese); two empty answers agree."""
    p, g = _answer_tokens(prediction), _answer_tokens(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    return _f1(common / len(p), common / len(g)) if common else 0.0


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """exact_match and f1 in percent, each row scored against its best gold answer (an
    unanswerable question has no gold answers: only the empty prediction is right)."""
    _check_pair(predictions, golds)
    em = f1 = 0.0
    for p, answers in zip(predictions, golds):
        answers = list(answers) or [""]
        em += max(float(normalize_answer(p) == normalize_answer(a)) for a in answers)
        f1 += max(answer_f1(p, a) for a in answers)
    return {"exact_match": 100 * em / len(golds), "f1": 100 * f1 / len(golds)}


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); inf instead of OverflowError for a diverged run."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------- words

# Han ideographs (basic, extension A, compatibility, extensions B-F) and Japanese kana:
# scripts written without spaces between words, which whitespace splitting cannot cut.
_CJK = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]"
)


def has_cjk(text: str) -> bool:
    """True when text holds characters that are written without spaces between words."""
    return _CJK.search(text) is not None


@cache
def _jieba():
    """A jieba tokenizer of our own, dictionary loaded once, without jieba's log lines.

    Our own instance: words jieba was taught elsewhere in the process (add_word,
    load_userdict on the global one) must not change metric values.
    """
    import jieba

    jieba_log = logging.getLogger("jieba")
    level = jieba_log.level
    jieba_log.setLevel(logging.WARNING)
    try:
        tokenizer = jieba.Tokenizer()
        tokenizer.initialize()
    finally:
        jieba_log.setLevel(level)
    return tokenizer


def words(text: str, cjk: bool | None = None) -> list[str]:
    """The tokens ROUGE counts: jieba words for CJK text, else the text split on spaces.

    cjk=None decides from the text itself; `sentence_scores` decides once per pair so that
    a prediction and its label are always cut the same way. jieba also cuts the Latin
    parts of mixed text (punctuation becomes its own token); whitespace is never a token.
    """
    if not (has_cjk(text) if cjk is None else cjk):
        return text.split()
    return [w for w in _jieba().lcut(text) if not w.isspace()]


def bleu_tokens(text: str, cjk: bool | None = None) -> list[str]:
    """The tokens BLEU counts: every non-space character of CJK text, else `words`.

    Characters are BLEU's usual unit for Chinese (no segmenter errors to inherit), and
    what LLaMA-Factory's bleu-4 counts, so numbers stay comparable with its runs.
    """
    if not (has_cjk(text) if cjk is None else cjk):
        return text.split()
    return [c for c in text if not c.isspace()]


# --------------------------------------------------------------------------- BLEU, ROUGE


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(zip(*(tokens[i:] for i in range(n))))


def bleu4(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """Sentence BLEU-4 in [0, 1]: uniform weights, NIST geometric smoothing.

    Clipped n-gram precisions for n = 1..4; the k-th order with no match (counting from 1)
    gets 1 / (2**k * its n-gram count) instead of 0, an order the hypothesis is too short
    for counts as one n-gram. No unigram match at all scores 0. Brevity penalty
    exp(1 - len(ref) / len(hyp)) when the hypothesis is shorter than the reference.
    Same values as nltk's sentence_bleu([ref], hyp, smoothing_function=method3).
    """
    if not hypothesis:
        return 0.0
    log_precisions, misses = [], 0
    for n in range(1, 5):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matched = sum(min(count, ref[gram]) for gram, count in hyp.items())
        total = max(1, sum(hyp.values()))
        if matched == 0:
            if n == 1:
                return 0.0
            misses += 1
            log_precisions.append(math.log(1 / (2**misses * total)))
        else:
            log_precisions.append(math.log(matched / total))
    ratio = len(reference) / len(hypothesis)
    brevity = 1.0 if ratio < 1 else math.exp(1 - ratio)
    return brevity * math.exp(math.fsum(0.25 * lp for lp in log_precisions))


def _overlap_f1(overlap: int, hyp_len: int, ref_len: int) -> float:
    return _f1(_safe_div(overlap, hyp_len), _safe_div(overlap, ref_len))


def rouge_n(hypothesis: Sequence[str], reference: Sequence[str], n: int) -> float:
    """ROUGE-N F1 in [0, 1]: n-grams shared by both texts, each counted as often as the
    rarer side has it (repeated words are not rewarded beyond the reference)."""
    hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
    overlap = sum((hyp & ref).values())
    return _overlap_f1(overlap, sum(hyp.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro).

    Bit i of `row` is 0 where a[: i + 1] gains a match; each token of b updates the whole
    row with one addition, so long generations cost O(len(b)) big-int operations instead
    of a len(a) x len(b) table of Python steps.
    """
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        matches = row & positions.get(token, 0)
        row = ((row + matches) | (row - matches)) & full
    return len(a) - row.bit_count()


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 in [0, 1]: the longest common subsequence over both lengths."""
    overlap = lcs_length(hypothesis, reference)
    return _overlap_f1(overlap, len(hypothesis), len(reference))


def sentence_scores(prediction: str, label: str) -> dict[str, float]:
    """BLEU-4 (characters for CJK) and ROUGE-1/2/L F1 (words) of one prediction, in [0, 1].

    If either text has CJK characters both are cut as CJK. An empty prediction or label
    scores 0 on every metric, even when both are empty: nltk, rouge-score and LLaMA-Factory
    all do so, and means over a set stay comparable with theirs.
    """
    cjk = has_cjk(prediction) or has_cjk(label)
    hyp, ref = words(prediction, cjk), words(label, cjk)
    return {
        "bleu-4": bleu4(bleu_tokens(prediction, cjk), bleu_tokens(label, cjk)),
        "rouge-1": rouge_n(hyp, ref, 1),
        "rouge-2": rouge_n(hyp, ref, 2),
        "rouge-l": rouge_l(hyp, ref),
    }


def generation_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean over rows of each sentence-level score, x100, rounded to 4 decimals.

    Keys: "bleu-4", "rouge-1", "rouge-2", "rouge-l" (the names LLaMA-Factory reports).
    """
    _check_pair(predictions, labels)
    rows = [sentence_scores(p, y) for p, y in zip(predictions, labels)]
    return {
        key: round(100 * math.fsum(row[key] for row in rows) / len(rows), 4) for key in rows[0]
    }
