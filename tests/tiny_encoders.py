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
    words = POSITIVE + NEGATIVE + THINGS + FILLERS + PEOPLE + PLACES + OTHER + list(EN_FR) + list(EN_FR.values())
    return [" ".join(words + ["in", "smith", "lives", "where", "does", "live", "?", ".", "with", "of"])] * 4


def build_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, dropout: float = 0.1) -> Path:
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
                        pad_token_id=fast.pad_token_id, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
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


EN_FR = {"red": "rouge", "blue": "bleu", "green": "vert", "cat": "chat", "dog": "chien", "house": "maison",
         "big": "grand", "small": "petit", "white": "blanc", "black": "noir", "sun": "soleil", "moon": "lune"}


def translation_rows(n: int, seed: int = 0) -> list[dict]:
    """A word-for-word 'translation' (English words -> French ones, in order): a mapping only a
    model that reads its source through cross-attention can learn."""
    rng = random.Random(seed)
    words = sorted(EN_FR)
    rows = []
    for _ in range(n):
        source = [rng.choice(words) for _ in range(rng.randrange(3, 6))]
        rows.append({"source": " ".join(source), "target": " ".join(EN_FR[w] for w in source)})
    return rows


def write_translation(folder: Path, n_train: int = 512, n_test: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "en_fr.json").write_text(json.dumps(translation_rows(n_train, 0)), encoding="utf-8")
    (folder / "en_fr_test.json").write_text(json.dumps(translation_rows(n_test, 1)), encoding="utf-8")
    info = {"en_fr": {"file_name": "en_fr.json"}, "en_fr_test": {"file_name": "en_fr_test.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def _word_tokenizer(specials: list[str], template: str, **names: str):
    """A word-level tokenizer over every word the task data uses (and letters, for the rest)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=names["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = vocabulary_texts() + [" ".join(list(EN_FR) + list(EN_FR.values()))] + [chr(c) for c in range(97, 123)]
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in specials if t in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def build_tiny_t5(folder: Path, d_model: int = 64) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>",
                          unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_ff=2 * d_model, d_kv=16, num_layers=2,
                      num_decoder_layers=2, num_heads=4, decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_tiny_bart(folder: Path, d_model: int = 64) -> Path:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tok = _word_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", bos_token="<s>", pad_token="<pad>",
                          eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tok), d_model=d_model, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                        decoder_ffn_dim=2 * d_model, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id)
    BartForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def qa_rows(n: int, seed: int = 0, fillers: int = 2) -> list[dict]:
    """SQuAD-style rows: a context of filler sentences around one "<person> lives in <place>."
    and the question where that person lives; the answer is the place, at its character
    offset (more fillers: contexts longer than a window)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        sentences = [" ".join(rng.choice(OTHER) for _ in range(4)) + "." for _ in range(fillers)]
        sentences.insert(rng.randrange(fillers + 1), f"{person} lives in {place}.")
        context = " ".join(sentences)
        start = context.index(f"{person} lives in ") + len(f"{person} lives in ")
        rows.append({"context": context, "question": f"where does {person} live?",
                     "answers": {"text": [place], "answer_start": [start]}})
    return rows


def write_qa(folder: Path, n_train: int = 128, n_test: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qa.json").write_text(json.dumps(qa_rows(n_train, 0, fillers=6)), encoding="utf-8")
    (folder / "qa_test.json").write_text(json.dumps(qa_rows(n_test, 1, fillers=8)), encoding="utf-8")
    info = {"qa": {"file_name": "qa.json"}, "qa_test": {"file_name": "qa_test.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Cross-lingual pairs: English words and their French translation (no word in common, so
    only a trained encoder puts them together); any other row's translation is a negative."""
    return [{"anchor": r["source"], "positive": r["target"]} for r in translation_rows(n, seed)]


def write_pairs(folder: Path, n_train: int = 128, n_test: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.json").write_text(json.dumps(pair_rows(n_train, 0)), encoding="utf-8")
    (folder / "pairs_test.json").write_text(json.dumps(pair_rows(n_test, 1)), encoding="utf-8")
    info = {"pairs": {"file_name": "pairs.json"}, "pairs_test": {"file_name": "pairs_test.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder
