"""lathe.eval.metrics: hand-computed values, then agreement with the reference packages.

scikit-learn, nltk, rouge-score, sacrebleu and rouge-chinese are test-only dependencies:
each agreement test skips when its package is missing; Lathe itself never imports them.
"""

from __future__ import annotations

import logging
import math
import random
import subprocess
import sys

import pytest

from lathe.eval import metrics
from lathe.eval.metrics import (
    accuracy,
    bleu4,
    bleu_tokens,
    generation_scores,
    has_cjk,
    lcs_length,
    mae,
    mse,
    perplexity,
    precision_recall_f1,
    rouge_l,
    rouge_n,
    sentence_scores,
    words,
)

# Pairs (prediction, label) that a fine-tuned assistant could produce.
EN_PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("a b c d", "a b c e f"),  # no 4-gram match, brevity penalty
    ("the the the the the the the", "the cat is on the mat"),  # repeated words, clipped
    ("cat", "the cat is on the mat"),  # one-word hypothesis
    ("on the mat", "the cat is on the mat"),  # shorter than 4 tokens
    ("the cat is on the mat and it is happy there", "the cat is on the mat"),  # longer
    ("dogs bark loudly", "the cat is on the mat"),  # nothing in common
    ("It is a guide to action which ensures that the military always obeys the commands "
     "of the party", "It is a guide to action that ensures that the military will forever "
     "heed Party commands"),
]
ZH_PAIRS = [
    ("我是一个由Lathe训练的人工智能助手，可以回答你的问题。", "我是Lathe训练的AI助手，很高兴为你回答问题。"),
    ("北京是中国的首都，也是中国的政治和文化中心。", "中国的首都是北京。北京是全国的政治中心和文化中心。"),
    ("机器学习是人工智能的一个分支，它让计算机从数据中学习。",
     "机器学习是人工智能的分支，研究如何让计算机从数据中自动学习规律。"),
    ("你好！有什么我可以帮你的吗？", "你好，请问有什么可以帮助你的？"),
    ("今天天气很好，我们去公园散步吧。", "今天的天气非常好，适合去公园散步。"),
    ("这个问题的答案是42。", "答案是四十二。"),
    ("好", "今天天气很好。"),  # one character
    ("谢谢谢谢谢谢", "谢谢你"),  # repeated words
]


def _random_tokens(rng: random.Random, vocab: int, max_len: int) -> list[str]:
    return [f"w{rng.randrange(vocab)}" for _ in range(rng.randint(0, max_len))]


# --------------------------------------------------------------------------- classic


def test_classic_metrics_hand_computed() -> None:
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert mse([1, 2, 3], [1, 4, 0]) == pytest.approx(13 / 3)
    assert mae([1, 2, 3], [1, 4, 0]) == pytest.approx(5 / 3)
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7)) == pytest.approx(7)
    assert perplexity(1e6) == math.inf  # overflow: a diverged run, not an exception


def test_precision_recall_f1_hand_computed() -> None:
    # cat: p 1, r 1/2; dog: p 1/2, r 1; bird never predicted (p=r=0); fish never a label.
    labels = ["cat", "cat", "dog", "bird"]
    preds = ["cat", "dog", "dog", "fish"]
    macro = precision_recall_f1(preds, labels, average="macro")
    assert macro == pytest.approx({"precision": 1.5 / 4, "recall": 1.5 / 4, "f1": (4 / 3) / 4})
    micro = precision_recall_f1(preds, labels, average="micro")
    assert micro == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    # any hashable labels, even ones that cannot be sorted together
    # classes None, 1, (2, 3), "a": 1 never predicted, "a" never a label -> 2 of 4 right
    mixed = precision_recall_f1([None, "a", (2, 3)], [None, 1, (2, 3)])
    assert mixed == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


@pytest.mark.parametrize("average", ["macro", "micro"])
def test_classic_metrics_agree_with_sklearn(average: str) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1234)
    for n_classes, n_rows in [(2, 50), (5, 200), (12, 40)]:
        labels = [f"c{rng.randrange(n_classes)}" for _ in range(n_rows)]
        # the predictor also invents a class that never appears in labels
        preds = [f"c{rng.randrange(n_classes + 1)}" for _ in range(n_rows)]
        p, r, f, _ = skm.precision_recall_fscore_support(
            labels, preds, average=average, zero_division=0
        )
        ours = precision_recall_f1(preds, labels, average=average)
        assert ours == pytest.approx({"precision": p, "recall": r, "f1": f}, rel=1e-12)
        assert accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
    y = [rng.gauss(0, 3) for _ in range(100)]
    yhat = [v + rng.gauss(0, 1) for v in y]
    assert mse(yhat, y) == pytest.approx(skm.mean_squared_error(y, yhat), rel=1e-12)
    assert mae(yhat, y) == pytest.approx(skm.mean_absolute_error(y, yhat), rel=1e-12)


@pytest.mark.parametrize(
    "fn", [accuracy, precision_recall_f1, mse, mae, generation_scores], ids=lambda f: f.__name__
)
def test_empty_or_mismatched_inputs_are_value_errors(fn) -> None:
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match=r"differ in length \(2 vs 1\)"):
        fn(["1", "2"], ["1"])


def test_unknown_average_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'macro' or 'micro'"):
        precision_recall_f1([1], [1], average="weighted")


# --------------------------------------------------------------------------- tokens


def test_metrics_import_no_heavy_library() -> None:
    code = (
        "import sys, lathe.eval.metrics; "
        "print(sorted(m for m in ('jieba', 'torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"  # jieba loads on the first Chinese text, not at import


def test_jieba_loads_quietly(caplog: pytest.LogCaptureFixture, capsys) -> None:
    # jieba talks only through its logger, at DEBUG ("Building prefix dict ...")
    metrics._jieba.cache_clear()  # a fresh tokenizer; the first one when run in file order
    with caplog.at_level(logging.DEBUG, logger="jieba"):
        assert words("今天天气很好") == ["今天天气", "很", "好"]
        assert logging.getLogger("jieba").level == logging.DEBUG  # its level is given back
    assert [r.getMessage() for r in caplog.records if r.name == "jieba"] == []
    assert capsys.readouterr() == ("", "")


def test_words_and_bleu_tokens() -> None:
    assert words("Hello, world!  again\n") == ["Hello,", "world!", "again"]
    assert not has_cjk("Hello, world") and has_cjk("日本語のテキスト") and has_cjk("a 中 b")
    zh = words("我爱北京天安门, hello world!\n这是 Python3 测试。")
    assert zh == ["我", "爱", "北京", "天安门", ",", "hello", "world", "!", "这是", "Python3",
                  "测试", "。"]
    assert bleu_tokens("北京 是首都。") == ["北", "京", "是", "首", "都", "。"]
    assert bleu_tokens("the cat") == ["the", "cat"]
    # cjk=True forces the CJK cut: sentence_scores uses it when either side has CJK
    assert words("the cat", cjk=True) == ["the", "cat"]
    assert bleu_tokens("42", cjk=True) == ["4", "2"] and words("42", cjk=True) == ["42"]
    assert words("") == [] and bleu_tokens("") == []


# --------------------------------------------------------------------------- BLEU


def test_bleu4_hand_computed() -> None:
    assert bleu4("the cat sat on".split(), "the cat sat on".split()) == pytest.approx(1.0)
    # 3 tokens have no 4-gram: that order counts as one missed n-gram, smoothed to 1/2
    assert bleu4("the cat sat".split(), "the cat sat".split()) == pytest.approx(0.5**0.25)
    # p1 3/4, p2 2/3, p3 1/2, p4 no match -> 1/(2*1); hyp 4 < ref 5 -> exp(1 - 5/4)
    expected = math.exp(-0.25) * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    assert bleu4("a b c d".split(), "a b c e f".split()) == pytest.approx(expected, rel=1e-12)
    assert bleu4([], ["a"]) == bleu4(["a"], []) == bleu4([], []) == bleu4(["x"], ["y"]) == 0.0


def _nltk_bleu(hyp: list[str], ref: list[str]) -> float:
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    smooth = bleu_score.SmoothingFunction().method3
    return bleu_score.sentence_bleu([ref], hyp, smoothing_function=smooth)


@pytest.mark.parametrize("pair", EN_PAIRS + ZH_PAIRS + [("", "x"), ("x", ""), ("", "")])
def test_bleu4_equals_nltk_sentence_bleu(pair: tuple[str, str]) -> None:
    hyp, ref = bleu_tokens(pair[0]), bleu_tokens(pair[1])
    assert bleu4(hyp, ref) == pytest.approx(_nltk_bleu(hyp, ref), rel=1e-12, abs=1e-15)


def test_bleu4_equals_nltk_on_random_token_lists() -> None:
    rng = random.Random(7)
    for _ in range(300):  # small vocabularies: many repeats, partial and missing matches
        vocab = rng.randint(1, 8)
        hyp, ref = _random_tokens(rng, vocab, 12), _random_tokens(rng, vocab, 12)
        assert bleu4(hyp, ref) == pytest.approx(_nltk_bleu(hyp, ref), rel=1e-12, abs=1e-15)


def test_bleu4_equals_sacrebleu_exp_smoothing() -> None:
    sacre = pytest.importorskip("sacrebleu.metrics")
    # sacrebleu stops at an n-gram order the hypothesis lacks: compare from 4 tokens up
    on_spaces = sacre.BLEU(tokenize="none", smooth_method="exp", effective_order=False)
    for hyp, ref in EN_PAIRS:
        if len(hyp.split()) >= 4:
            want = on_spaces.sentence_score(hyp, [ref]).score / 100
            assert bleu4(hyp.split(), ref.split()) == pytest.approx(want, rel=1e-9)
    # sacrebleu's own Chinese tokenizer cuts pure Chinese text into characters, like ours
    zh = sacre.BLEU(tokenize="zh", smooth_method="exp", effective_order=False)
    for hyp, ref in ZH_PAIRS[1:5]:  # Chinese only: sacrebleu keeps "42" or "Lathe" whole
        want = zh.sentence_score(hyp, [ref]).score / 100
        assert bleu4(bleu_tokens(hyp), bleu_tokens(ref)) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- ROUGE


def test_rouge_hand_computed() -> None:
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    assert rouge_n(hyp, ref, 1) == pytest.approx(5 / 6)  # "the" counted twice on both sides
    assert rouge_n(hyp, ref, 2) == pytest.approx(3 / 5)  # the-cat, on-the, the-mat
    assert rouge_l(hyp, ref) == pytest.approx(5 / 6)  # the cat on the mat
    assert rouge_n(["the"] * 7, ref, 1) == pytest.approx(2 * (2 / 7) * (2 / 6) / (2 / 7 + 2 / 6))
    assert rouge_n([], [], 1) == rouge_l([], []) == rouge_l(["a"], []) == 0.0


def test_lcs_length_equals_dynamic_programming() -> None:
    def table_lcs(a: list[str], b: list[str]) -> int:
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(3)
    for max_len in [0, 5, 20, 300]:  # 300 tokens: rows wider than a machine word
        for _ in range(20):
            a, b = _random_tokens(rng, 6, max_len), _random_tokens(rng, 6, max_len)
            assert lcs_length(a, b) == table_lcs(a, b)


class _Given:
    """rouge-score tokenizer that returns our tokens (joined with NUL) unchanged."""

    def tokenize(self, text: str) -> list[str]:
        return text.split("\0") if text else []


def _rouge_score(hyp: list[str], ref: list[str]) -> dict[str, float]:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Given())
    got = scorer.score("\0".join(ref), "\0".join(hyp))  # score(target, prediction)
    return {k: got[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


def _ours(hyp: list[str], ref: list[str]) -> dict[str, float]:
    return {"rouge1": rouge_n(hyp, ref, 1), "rouge2": rouge_n(hyp, ref, 2),
            "rougeL": rouge_l(hyp, ref)}


@pytest.mark.parametrize("pair", EN_PAIRS + ZH_PAIRS + [("", "x"), ("x", ""), ("", "")])
def test_rouge_equals_rouge_score(pair: tuple[str, str]) -> None:
    hyp, ref = words(pair[0]), words(pair[1])
    assert _ours(hyp, ref) == pytest.approx(_rouge_score(hyp, ref), rel=1e-12, abs=1e-15)


def test_rouge_equals_rouge_score_on_random_token_lists() -> None:
    rng = random.Random(11)
    for _ in range(300):
        vocab = rng.randint(1, 8)
        hyp, ref = _random_tokens(rng, vocab, 15), _random_tokens(rng, vocab, 15)
        assert _ours(hyp, ref) == pytest.approx(_rouge_score(hyp, ref), rel=1e-12, abs=1e-15)


def test_rouge_matches_rouge_chinese_without_repeats() -> None:
    rouge_chinese = pytest.importorskip("rouge_chinese")
    # rouge-chinese counts each distinct n-gram once and splits sentences at 。！？; on
    # single sentences without repeated n-grams it must give our numbers (F1 has a 1e-8 term)
    checked = 0
    for pred, label in ZH_PAIRS:
        hyp, ref = words(pred), words(label)
        if any(len(set(t)) < len(t) for t in (hyp, ref)) or "。" in label[:-1]:
            continue
        got = rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
        want = {"rouge1": got["rouge-1"]["f"], "rouge2": got["rouge-2"]["f"],
                "rougeL": got["rouge-l"]["f"]}
        assert _ours(hyp, ref) == pytest.approx(want, abs=1e-7)
        checked += 1
    assert checked >= 3


# --------------------------------------------------------------------------- generation_scores


def test_generation_scores_shape_and_values() -> None:
    same = generation_scores(["the cat sat on the mat", "你好世界"], ["the cat sat on the mat", "你好世界"])
    assert same == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    half = generation_scores(["the cat sat on the mat", "dogs"], ["the cat sat on the mat", "cats"])
    assert half == {"bleu-4": 50.0, "rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0}
    # empty strings score 0, even when both are empty (as nltk and rouge-score do)
    assert set(sentence_scores("", "").values()) == set(sentence_scores("", "x").values()) == {0.0}
    # a prediction without Chinese is cut like its Chinese label: "42" matches
    mixed = sentence_scores("42", "答案是42")
    assert mixed["rouge-1"] == pytest.approx(0.5) and mixed["bleu-4"] > 0


def test_generation_scores_as_llamafactory_reports_them() -> None:
    """Mean of per-row scores x100, 4 decimals; BLEU on characters as LLaMA-Factory counts
    them (nltk on list(text)), ROUGE on jieba words with rouge-score's counting."""
    preds, labels = [p for p, _ in ZH_PAIRS], [y for _, y in ZH_PAIRS]
    got = generation_scores(preds, labels)
    bleu = [_nltk_bleu(list(p), list(y)) for p, y in ZH_PAIRS]  # no spaces in these texts
    rouge = [_rouge_score(words(p), words(y)) for p, y in ZH_PAIRS]
    assert got["bleu-4"] == round(100 * math.fsum(bleu) / len(bleu), 4)
    for ours, theirs in [("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")]:
        assert got[ours] == round(100 * math.fsum(r[theirs] for r in rouge) / len(rouge), 4)
    assert 0 < got["rouge-2"] < got["rouge-1"] < 100
