"""Text preparation and augmentation (lathe.data.textprep): what each option does to text,
determinism, and that augmented copies never reach the validation or test rows."""

from __future__ import annotations

import pytest

from lathe.data.textprep import Augmenter, TextPrep, prepare_row, read_synonyms
from lathe.errors import ConfigError


def test_each_preparation_step():
    assert TextPrep(lowercase=True)("Hello WORLD") == "hello world"
    assert TextPrep(unify_punctuation=True)("ＡＢＣ１２３！“引号”—dash…") == 'ABC123!"引号"-dash...'
    assert TextPrep(remove_stopwords=True)("The product is very good, and the price is low.") == \
        "product good, price low."
    assert TextPrep(remove_stopwords=True)("我们的产品是很好的") == "产品好"
    assert TextPrep(stem=True)("Running runners ran easily") == "Run runner ran easili"
    assert not TextPrep().active and TextPrep(stem=True).active


def test_rows_are_prepared_field_by_field_and_labels_are_not_touched():
    row = {"text": "Great PRODUCT", "text_pair": "", "labels": "Positive"}
    assert prepare_row(row, "cls", TextPrep(lowercase=True)) and row == {"text": "great product", "text_pair": "",
                                                                        "labels": "Positive"}
    conv = {"roles": ["user", "assistant"], "contents": ["Hi THERE", "Hello"], "system": "Be KIND"}
    prepare_row(conv, "sft", TextPrep(lowercase=True))
    assert conv["contents"] == ["hi there", "hello"] and conv["system"] == "be kind"
    tagged = {"tokens": ["Smith", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}
    prepare_row(tagged, "tagging", TextPrep(lowercase=True, remove_stopwords=True))
    assert tagged["tokens"] == ["smith", "lives", "in", "paris"]  # one word per tag, none dropped


def test_augmentation_is_seeded_changes_inputs_only_and_uses_synonyms(tmp_path):
    synonyms = tmp_path / "syn.txt"
    synonyms.write_text("good great fine\nbad poor\n", encoding="utf-8")
    groups = read_synonyms(str(synonyms))
    assert groups["good"] == ["great", "fine"] and groups["poor"] == ["bad"]
    rows = [{"text": f"this is a good product number {i}", "text_pair": "", "labels": "pos"} for i in range(20)]
    a = Augmenter(("synonym",), 1.0, 0.1, groups, seed=0)
    copies = a.copies(rows, "cls")
    assert len(copies) == 20 and all(c["labels"] == "pos" for _, c in copies)
    assert all(c["text"].split()[3] in ("great", "fine") for _, c in copies)
    assert copies == a.copies(rows, "cls")  # the same seed, the same copies
    assert copies != Augmenter(("swap",), 1.0, 0.1, groups, seed=0).copies(rows, "cls")
    half = Augmenter(("swap",), 0.5, 0.1, {}, seed=0).copies(rows, "cls")
    assert 4 <= len(half) <= 16  # about every other row
    conv = [{"roles": ["user", "assistant"], "contents": ["what is your good name", "I am good"]}]
    (_, copy), = Augmenter(("delete",), 1.0, 0.5, {}, seed=1).copies(conv, "sft")
    assert copy["contents"][1] == "I am good" and len(copy["contents"][0].split()) < 5  # the reply is kept
    with pytest.raises(ConfigError, match="augment_synonyms: .* is not a file"):
        read_synonyms(str(tmp_path / "missing.txt"))


def test_copies_stay_with_their_row_and_only_in_training_rows():
    from datasets import Dataset

    from lathe.config.schema import DataConfig
    from lathe.data.loader import DataStats, split

    rows = [{"input_ids": [1], "labels": i % 2, "_row": i, "_aug": 0} for i in range(40)]
    rows += [{"input_ids": [2], "labels": i % 2, "_row": i, "_aug": 1} for i in range(40)]
    stats = DataStats()
    train, ev, test = split(Dataset.from_list(rows), None, None, DataConfig(dataset=["d"], val_size=8, test_size=8),
                            0, stats)
    assert (len(ev), len(test)) == (8, 8)
    assert all(ids == [1] for ids in list(ev["input_ids"]) + list(test["input_ids"]))  # no copy is evaluated
    assert len(train) == 48 and stats.augmented_rows == 24  # 24 rows and their 24 copies
    assert "_aug" not in train.column_names and "_row" not in ev.column_names
