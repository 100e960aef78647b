"""The split plan (lathe.data.splits): sizes, seeds, stratification, folds, groups."""

from __future__ import annotations

from collections import Counter

import pytest

from lathe.data.splits import plan, size_of
from lathe.errors import DataError


def test_fractions_and_counts_of_all_rows():
    p = plan(100, seed=0, val_size=0.1, test_size=0.1)
    assert (len(p.train), len(p.val), len(p.test)) == (80, 10, 10)
    assert sorted(p.train + p.val + p.test) == list(range(100))  # every row once
    p = plan(100, seed=0, val_size=7, test_size=0.2)
    assert (len(p.train), len(p.val), len(p.test)) == (73, 7, 20)
    assert size_of(0.001, 100) == 1 and size_of(0, 100) == 0 and size_of(3, 100) == 3


def test_the_seed_decides_and_the_test_rows_do_not_move_with_val_size():
    a, b = plan(50, seed=1, test_size=0.2), plan(50, seed=1, test_size=0.2, val_size=0.3)
    assert a.test == b.test and set(b.val).isdisjoint(b.test)
    assert plan(50, seed=2, test_size=0.2).test != a.test
    folds = [plan(50, seed=1, test_size=0.2, folds=4, fold=k) for k in (1, 2, 3, 4)]
    assert all(f.test == a.test for f in folds)  # cross-validation holds out the same test set


def test_stratified_splits_keep_the_class_shares():
    labels = [0] * 80 + [1] * 20
    p = plan(100, seed=3, test_size=0.1, val_size=0.1, labels=labels)
    for part in (p.test, p.val):
        assert Counter(labels[i] for i in part) == {0: 8, 1: 2}
    assert p.stratified
    # without stratification a seed can easily give a test set with other shares
    shares = {tuple(sorted(Counter(labels[i] for i in plan(100, seed=s, test_size=0.1).test).items()))
              for s in range(20)}
    assert len(shares) > 1


def test_folds_cover_every_row_once_and_are_stratified():
    labels = [i % 3 for i in range(30)]
    held = []
    for k in range(1, 6):
        p = plan(30, seed=0, folds=5, fold=k, labels=labels)
        assert len(p.val) == 6 and len(p.train) == 24 and not set(p.val) & set(p.train)
        assert Counter(labels[i] for i in p.val) == {0: 2, 1: 2, 2: 2}
        held += p.val
    assert sorted(held) == list(range(30))


def test_rows_of_one_example_stay_together():
    groups = [i // 3 for i in range(30)]  # ten examples, three windows each
    p = plan(30, seed=0, test_size=0.2, groups=groups)
    assert len(p.test) == 6  # two examples
    test_groups = {groups[i] for i in p.test}
    assert all(groups[i] not in test_groups for i in p.train)


def test_impossible_sizes_say_how_many_rows_there_are():
    with pytest.raises(DataError, match="val_size=5, test_size=5 leave no training rows out of the 10 rows of d"):
        plan(10, seed=0, val_size=5, test_size=5, where="d")
    with pytest.raises(DataError, match="folds=11 is more than the 10 rows of d left for cross-validation"):
        plan(10, seed=0, folds=11, fold=1, where="d")
    with pytest.raises(DataError, match="after the test split"):
        plan(10, seed=0, folds=10, fold=1, test_size=2, where="d")


def _tokenized(labels: list, origins: list[str] | None = None):
    from datasets import Dataset

    rows = [{"input_ids": [1, 2, 3], "labels": label, "origin": (origins or [f"f:{i}" for i in range(len(labels))])[i]}
            for i, label in enumerate(labels)]
    return Dataset.from_list(rows)


def test_the_loader_splits_tokenized_rows_by_class_and_counts_them():
    from lathe.config.schema import DataConfig
    from lathe.data.loader import DataStats, split

    labels = [0] * 40 + [1] * 10
    stats = DataStats()
    data = DataConfig(dataset=["d"], val_size=0.2, test_size=10, stratify=True)
    train, ev, test = split(_tokenized(labels), None, None, data, 0, stats)
    assert (len(train), len(ev), len(test)) == (30, 10, 10)
    assert sorted(test["labels"]) == [0] * 8 + [1] * 2 and sorted(ev["labels"]) == [0] * 8 + [1] * 2
    assert stats.split == "stratified by label"
    # a registered test set is kept as it is: only the validation rows are split off
    given = _tokenized([0, 1])
    train, ev, test = split(_tokenized(labels), None, given, DataConfig(dataset=["d"], val_size=5), 0, DataStats())
    assert test is given and (len(train), len(ev)) == (45, 5)


def test_folds_leave_the_test_set_for_the_final_run_and_stratify_classifiers_by_default():
    from lathe.config.schema import DataConfig
    from lathe.data.loader import DataStats, split

    labels = [0] * 30 + [1] * 15
    stats = DataStats()
    train, ev, test = split(_tokenized(labels), None, None, DataConfig(dataset=["d"], folds=3, fold=2, test_size=9),
                            0, stats)
    assert test is None and (len(train), len(ev)) == (24, 12)
    assert sorted(ev["labels"]) == [0] * 8 + [1] * 4
    assert stats.split == "fold 2 of 3, stratified by label"


def test_stratifying_rows_without_one_class_each_is_refused():
    from lathe.config.schema import DataConfig
    from lathe.data.loader import DataStats, split

    multi = _tokenized([[1.0, 0.0], [0.0, 1.0]] * 5)
    with pytest.raises(DataError, match="stratify: true splits by class, and the rows of d have multi-label"):
        split(multi, None, None, DataConfig(dataset=["d"], test_size=2, stratify=True), 0, DataStats())
    regression = _tokenized([0.5, 1.5] * 5)
    with pytest.raises(DataError, match="have regression labels"):
        split(regression, None, None, DataConfig(dataset=["d"], test_size=2, stratify=True), 0, DataStats())
    # unset: folds of such rows are dealt at random
    _, ev, _ = split(regression, None, None, DataConfig(dataset=["d"], folds=2, fold=1), 0, DataStats())
    assert len(ev) == 5


def test_windows_of_one_question_stay_in_one_split():
    from lathe.config.schema import DataConfig
    from lathe.data.loader import DataStats, split

    origins = [f"qa.json:{i // 2}" for i in range(20)]  # ten questions, two windows each
    train, ev, test = split(_tokenized([0] * 20, origins), None, None, DataConfig(dataset=["d"], test_size=0.2),
                            0, DataStats())
    assert len(test) == 4 and not set(test["origin"]) & set(train["origin"])


def test_the_data_report_plans_the_three_sizes():
    from lathe.config.schema import DataConfig
    from lathe.data.inspect import format_report
    from lathe.report import planned_splits

    sp = planned_splits(DataConfig(val_size=0.1, test_size=0.1), 100)
    assert sp == {"rows": 100, "train": 80, "eval": 10, "test": 10}
    assert planned_splits(DataConfig(folds=5, test_size=10), 100) == {"rows": 100, "test": 10, "folds": 5,
                                                                      "train": 72, "eval": 18}
    report = {"config": {}, "rows": 100, "examples": [], "splits": sp,
              "lengths": {k: dict.fromkeys(("min", "median", "p95", "max", "mean"), 1) for k in
                          ("prompt", "response", "total")},
              "truncation": {"cutoff_len": 8, "fit": 1, "cut": 0, "dropped": 0, "trained_tokens_removed": 0},
              "padding": {"pad_to_multiple_of": 1, "batch_size": 1, "without_packing": 0, "with_packing": 0,
                          "padding_free": 0, "packed_rows": 1}}
    assert "Splits of the 100 rows: train 80, eval 10, test 10" in format_report(report, [])
