"""Tiny encoder models for the task tests, built locally and saved with save_pretrained: a
BERT with a WordPiece tokenizer trained on the words the task data uses, and synthetic
labelled rows whose label follows a rule a model can learn in a few steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "lovely", "fine", "happy", "nice"]
NEGATIVE = ["bad", "awful", "poor", "sad", "broken", "ugly"]
THINGS = ["film", "book", "meal", "phone", "song", "room", "chair", "trip", "game", "shirt"]
FILLERS = ["the", "a", "this", "my", "our", "that", "was", "is", "really", "very", "quite", "so"]


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows {"text", "label"}: positive when the sentence has a positive word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        words = [rng.choice(FILLERS[:6]), rng.choice(THINGS), rng.choice(FILLERS[6:]), word]
        rows.append({"text": " ".join(words), "label": "positive" if positive else "negative"})
    return rows


def vocabulary_texts() -> list[str]:
    return [" ".join(POSITIVE + NEGATIVE + THINGS + FILLERS + PEOPLE + PLACES + OTHER + ["in", "smith"])] * 4


def build_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A 2-layer BERT (hidden 32) and its WordPiece tokenizer, saved as a model folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(vocabulary_texts() + [chr(c) for c in range(97, 123)],
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                        pad_token_id=fast.pad_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def write_sentiment(folder: Path, n_train: int = 96, n_test: int = 32, fmt: str = "csv") -> Path:
    """A dataset_dir with `sentiment` (train) and `sentiment_test` (held out), as CSV or JSON."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, rows in (("sentiment", sentiment_rows(n_train, 0)), ("sentiment_test", sentiment_rows(n_test, 1))):
        path = folder / f"{name}.{fmt}"
        if fmt == "csv":
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=["text", "label"])
                w.writeheader()
                w.writerows(rows)
        else:
            path.write_text(json.dumps(rows), encoding="utf-8")
        info[name] = {"file_name": path.name}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]
PLACES = ["paris", "rome", "oslo", "lima", "cairo", "delhi"]
OTHER = ["the", "film", "was", "good", "met", "went"]


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences of people (B-PER, with a surname I-PER), places after "in" (B-LOC) and filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words: list[str] = []
        tags: list[str] = []
        for part in rng.sample(["person", "place", "word", "word"], 4):
            if part == "person":
                surname = rng.random() < 0.3
                words += [rng.choice(PEOPLE)] + (["smith"] if surname else [])
                tags += ["B-PER"] + (["I-PER"] if surname else [])
            elif part == "place":
                words += ["in", rng.choice(PLACES)]
                tags += ["O", "B-LOC"]
            else:
                words.append(rng.choice(OTHER))
                tags.append("O")
        rows.append({"tokens": words, "tags": tags})
    return rows


def write_ner(folder: Path, n_train: int = 96, n_test: int = 24) -> Path:
    """A dataset_dir with `ner` (JSON rows of tokens and tags) and `ner_test` (a CoNLL file:
    word, a POS column, tag; blank lines between sentences)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ner.json").write_text(json.dumps(ner_rows(n_train, 0)), encoding="utf-8")
    lines = []
    for row in ner_rows(n_test, 1):
        lines += [f"{w} X {t}" for w, t in zip(row["tokens"], row["tags"])] + [""]
    (folder / "ner_test.conll").write_text("-DOCSTART- -X- O\n\n" + "\n".join(lines), encoding="utf-8")
    info = {"ner": {"file_name": "ner.json"}, "ner_test": {"file_name": "ner_test.conll"}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder
