"""The label set of a classification run (lathe.data.tasks) and the task metrics, checked
against scikit-learn."""

from __future__ import annotations

import json

import pytest

from lathe.data.tasks import MULTI, REGRESSION, SINGLE, resolve_labels
from lathe.errors import DataError
from lathe.eval import metrics as M


def rows(*labels, where="f.csv"):
    return [{"label": json.dumps(v), "origin": f"{where} line {i + 2}"} for i, v in enumerate(labels)]


def test_names_from_the_data_are_sorted_numbers_by_value():
    assert resolve_labels(rows("neg", "pos", "neg"), []).names == ("neg", "pos")
    labels = resolve_labels(rows("10", "9", "2"), [])  # CSV cells are text: classes, numeric order
    assert labels.names == ("2", "9", "10") and labels.problem_type == SINGLE
    assert labels.encode('"10"', "x") == 2


def test_integer_ids_and_label_names():
    assert resolve_labels(rows(0, 2, 1), []).names == ("0", "1", "2")
    assert resolve_labels(rows(0, 1), [], num_labels=4).names == ("0", "1", "2", "3")
    labels = resolve_labels(rows(0, 1, "spam"), [], label_names=["ham", "spam"])
    assert labels.names == ("ham", "spam")
    assert [labels.encode(r["label"], "x") for r in rows(0, 1, "spam")] == [0, 1, 1]
    with pytest.raises(DataError, match=r"f.csv line 3: label 'eggs' is not one of the 2 classes"):
        resolve_labels(rows("ham", "eggs"), [], label_names=["ham", "spam"])


def test_problem_type_auto():
    assert resolve_labels(rows(["a", "b"], ["b"]), []).problem_type == MULTI
    assert resolve_labels(rows(0.5, 1.25, 3), []).problem_type == REGRESSION
    assert resolve_labels(rows("0.5", "2.75"), []).problem_type == REGRESSION  # CSV numbers with decimals
    labels = resolve_labels(rows("a,b", "c"), [], problem_type=MULTI)  # a CSV cell of several names
    assert labels.names == ("a", "b", "c") and labels.encode('"a,b"', "x") == [1.0, 1.0, 0.0]


def test_bad_labels_name_file_and_row():
    with pytest.raises(DataError, match=r"mixes types: f.csv line 3 has a name, f.csv line 2 a number"):
        resolve_labels(rows(1, "pos"), [])
    with pytest.raises(DataError, match=r"mixes lists and single labels: f.csv line 2 has a list"):
        resolve_labels(rows(["a"], "b"), [])
    with pytest.raises(DataError, match=r"f.csv line 3: label 'high' is not a number.*regression"):
        resolve_labels(rows(1.5, "high"), [], problem_type=REGRESSION)
    with pytest.raises(DataError, match=r"num_labels=3 disagrees with the data: it has 2 classes"):
        resolve_labels(rows("a", "b"), [], num_labels=3)
    with pytest.raises(DataError, match="only one class"):
        resolve_labels(rows("a", "a"), [])
    with pytest.raises(DataError, match=r"test.csv line 3: eval label 'maybe' never appears in the training rows"):
        resolve_labels(rows("yes", "no"), rows("yes", "maybe", where="test.csv"))
    with pytest.raises(DataError, match="num_labels=2 with problem_type: regression"):
        resolve_labels(rows(1.5, 2.5), [], num_labels=2)


def test_config_keys_round_trip():
    labels = resolve_labels(rows("b", "a"), [])
    assert labels.config_keys() == {"problem_type": SINGLE, "label_names": ["a", "b"]}
    again = resolve_labels(rows("b", "a"), [], **labels.config_keys())
    assert again == labels


def test_task_metrics_agree_with_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    import random

    rng = random.Random(0)
    y = [rng.randrange(4) for _ in range(200)]
    p = [v if rng.random() < 0.6 else rng.randrange(4) for v in y]
    assert M.confusion_matrix(p, y, 4) == skm.confusion_matrix(y, p, labels=range(4)).tolist()
    per = M.per_class_scores(p, y, ["a", "b", "c", "d"])
    f1s = skm.f1_score(y, p, average=None, labels=range(4))
    assert [per[n]["f1"] for n in "abcd"] == pytest.approx(list(f1s))
    scores = M.classification_scores(p, y)
    assert scores["f1_macro"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert scores["precision_micro"] == pytest.approx(skm.precision_score(y, p, average="micro"))

    yr = [rng.uniform(-2, 2) for _ in range(100)]
    pr = [v + rng.gauss(0, 0.5) for v in yr]
    got = M.regression_scores(pr, yr)
    assert got["r2"] == pytest.approx(skm.r2_score(yr, pr))
    assert got["mse"] == pytest.approx(skm.mean_squared_error(yr, pr))
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(yr, pr))

    ym = [[rng.randrange(2) for _ in range(5)] for _ in range(60)]
    pm = [[v if rng.random() < 0.7 else 1 - v for v in row] for row in ym]
    got = M.multilabel_scores(pm, ym)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(ym, pm))
    for avg in ("micro", "macro"):
        assert got[f"f1_{avg}"] == pytest.approx(skm.f1_score(ym, pm, average=avg, zero_division=0))
        assert got[f"recall_{avg}"] == pytest.approx(skm.recall_score(ym, pm, average=avg, zero_division=0))


def test_lower_is_better_metrics_flip_greater_is_better(tmp_path):
    from lathe.config import load_config
    from lathe.recipes.common import build_training_args

    base = {"model_name_or_path": "x", "dataset": "d", "output_dir": str(tmp_path / "o"), "stage": "cls",
            "val_size": 0.1}
    args = build_training_args(load_config({**base, "metric_for_best_model": "mse"}), has_eval=True)
    assert args.greater_is_better is False
    args = build_training_args(load_config({**base, "metric_for_best_model": "f1_macro"}), has_eval=True)
    assert args.greater_is_better is True


def test_task_keys_belong_to_their_stage():
    from lathe.config import load_config
    from lathe.errors import ConfigError

    base = {"model_name_or_path": "x", "dataset": "d", "output_dir": "o"}
    with pytest.raises(ConfigError, match="label_names applies only to stage cls or tagging, but stage is sft"):
        load_config({**base, "label_names": "a,b"})
    with pytest.raises(ConfigError, match="num_labels=3 but label_names has 2 names"):
        load_config({**base, "stage": "cls", "label_names": "a,b", "num_labels": 3})
    with pytest.raises(ConfigError, match="label_names names 'a' twice"):
        load_config({**base, "stage": "cls", "label_names": "a,b,a"})


def test_a_model_without_the_head_is_refused_before_loading(tmp_path):
    from transformers import MambaConfig

    from lathe.errors import ModelError
    from lathe.model.load import check_task_head

    MambaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"stage cls needs a model with a sequence-classification head, and "
                                         r"mamba has none in transformers.*bert"):
        check_task_head(str(tmp_path), "seq_cls", "cls")


def test_entity_spans_and_scores_agree_with_seqeval():
    """conlleval's reading of IOB1, IOB2 (BIO) and IOBES tags, against seqeval on random tags."""
    seqeval = pytest.importorskip("seqeval.metrics")
    import random

    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-PER", "S-LOC", "I-ORG", "E-ORG", "S-PER"]
    for _ in range(2000):
        seq = [rng.choice(tags) for _ in range(rng.randrange(1, 9))]
        assert sorted(M.entities(seq)) == sorted(get_entities(seq)), seq
    gold = [[rng.choice(tags[:5]) for _ in range(6)] for _ in range(50)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags[:5]) for t in y] for y in gold]
    got = M.entity_scores(pred, gold)
    assert got["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
    assert got["precision"] == pytest.approx(seqeval.precision_score(gold, pred))
    assert got["recall"] == pytest.approx(seqeval.recall_score(gold, pred))
    assert got["f1_macro"] == pytest.approx(seqeval.f1_score(gold, pred, average="macro"))
    assert M.entities(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC"]) == \
        [("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5)]


def test_tag_set_order_and_inside_tags():
    from lathe.data.tasks import inside_tag, resolve_tags

    def tagged(*seqs):
        return [{"tags": json.dumps(s), "origin": f"t.json row {i}"} for i, s in enumerate(seqs)]

    tags = resolve_tags(tagged(["B-PER", "I-PER", "O"], ["B-LOC", "O"]), [])
    assert tags.names == ("O", "B-LOC", "B-PER", "I-PER")
    assert inside_tag(tags.names) == [0, 1, 3, 3]  # B-LOC has no I-LOC: it keeps its own tag
    with pytest.raises(DataError, match="tags mix names and ids: t.json row 0 has a tag name, t.json row 1 an id"):
        resolve_tags(tagged(["O"], [1]), [])
    assert resolve_tags(tagged([0, 2]), []).names == ("0", "1", "2")


def test_squad_scores():
    got = M.squad_scores(["The Eiffel tower!", "in rome", ""], [["eiffel tower"], ["rome", "in Rome city"], []])
    assert got["exact_match"] == pytest.approx(100 * 2 / 3)  # normalised match; an empty answer to none
    assert got["f1"] == pytest.approx(100 * (1 + 0.8 + 1) / 3)  # "in rome" vs "in rome city": 2 of 2 and 3
    assert M.answer_f1("北京大学", "北京") == pytest.approx(2 * 0.5 * 1 / 1.5)  # characters for Chinese
