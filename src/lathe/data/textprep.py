"""Text preparation and augmentation, the options the text-classification references teach;
all off by default.

Preparation (every split, so training and evaluation see the same text; `lathe predict`
reads the run's keys and prepares its rows the same way):
  lowercase           lower-case every letter
  unify_punctuation   full-width forms to half-width (NFKC: ＡＢＣ１２３！ -> ABC123!), Chinese
                      and curly quotes to straight ones, dashes and ellipses to ASCII
  remove_stopwords    drop the words of the small English and Chinese lists below (Chinese text
                      is split into words with jieba first)
  stem                English words to their stems (Snowball's English stemmer)
It applies to the text a row is read from: a classifier's text and text_pair, a seq2seq
source and target, conversation turns and the system prompt, preference replies. Tagging rows
(one tag per word) take lowercase, unify_punctuation and stem word by word; question answering
(answers are character offsets into the context) takes none.

Augmentation (training rows only; the loader keeps augmented copies out of the validation and
test rows): `augment` lists operations applied to a copy of a row, `augment_ratio` copies per
training row (0.5: every other row gets one), `augment_strength` the share of words each
operation touches (at least one), all drawn from `seed` and the row's position:
  swap     two words trade places        delete   a word is dropped (never the last one)
  insert   a word of the row (or a synonym of one) is inserted at a random place
  synonym  a word is replaced by a synonym from `augment_synonyms`: a text file, one group of
           interchangeable words per line (the offline resource; WordNet needs a download)
Only inputs are changed: a classifier's text, a seq2seq source, the user turns of a
conversation; never a reply, a label or a target.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lathe.errors import ConfigError

STOPWORDS_EN = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not of off on once only or other our ours ourselves out over own same she should so
some such than that the their theirs them themselves then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you your
yours yourself yourselves
""".split())
STOPWORDS_ZH = frozenset("""
的 了 和 是 在 也 就 都 而 及 与 着 或 一个 没有 我们 你们 他们 她们 它们 这 那 这个 那个 这些 那些 之 其
所 被 把 对 从 向 于 以 因为 所以 但是 但 然后 如果 虽然 而且 并且 还是 就是 只是 吧 吗 呢 啊 呀 嘛 哦
吗 么 得 地 又 再 还 很 太 更 最 已经 正在 将 会 能 可以 要 应该 此 该 各 每 某 等 等等 之后 之前
""".split())
# Quotes, dashes and ellipses NFKC leaves as they are.
_PUNCT = {"“": '"', "”": '"', "„": '"', "«": '"', "»": '"', "「": '"', "」": '"', "『": '"', "』": '"',
          "‘": "'", "’": "'", "‚": "'", "‹": "'", "›": "'", "—": "-", "–": "-", "―": "-", "‐": "-",
          "‑": "-", "−": "-", "…": "...", "、": ",", "。": ".", "《": '"', "》": '"', "〈": "'", "〉": "'"}
_PUNCT_RE = re.compile("|".join(map(re.escape, sorted(_PUNCT, key=len, reverse=True))))
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"\w+", re.UNICODE)
# Which fields of a converted row are text, and which of them augmentation may change, by kind.
PREPARED = {"cls": ("text", "text_pair"), "seq2seq": ("source", "target"), "text": ("text",),
            "embed": ("anchor", "positive", "negative"), "pairwise": ("contents", "system", "chosen", "rejected"),
            "sft": ("contents", "system"), "kto": ("contents", "system"), "prompt": ("contents", "system")}
AUGMENTED = {"cls": ("text", "text_pair"), "seq2seq": ("source",), "sft": ("contents",), "kto": ("contents",),
             "pairwise": ("contents",)}


@dataclass(frozen=True)
class TextPrep:
    lowercase: bool = False
    unify_punctuation: bool = False
    remove_stopwords: bool = False
    stem: bool = False

    @property
    def active(self) -> bool:
        return self.lowercase or self.unify_punctuation or self.remove_stopwords or self.stem

    def __call__(self, text: str) -> str:
        if self.unify_punctuation:
            text = _PUNCT_RE.sub(lambda m: _PUNCT[m.group()], unicodedata.normalize("NFKC", text))
        if self.lowercase:
            text = text.lower()
        if self.remove_stopwords:
            text = _without_stopwords(text)
        if self.stem:
            stemmer = _stemmer()
            text = _WORD.sub(lambda m: m.group() if _CJK.search(m.group()) else _stem_keep_case(stemmer, m.group()),
                             text)
        return text

    def word(self, word: str) -> str:
        """One word of a tagged row (stop words are not removed: every word has its tag)."""
        return TextPrep(self.lowercase, self.unify_punctuation, False, self.stem)(word) or word


def _stem_keep_case(stemmer: Any, word: str) -> str:
    stem = stemmer.stemWord(word.lower())
    return stem if not word[:1].isupper() else stem[:1].upper() + stem[1:]


def _without_stopwords(text: str) -> str:
    if _CJK.search(text):
        import jieba

        jieba.setLogLevel(60)  # its "Building prefix dict" lines are not the user's business
        pieces = [w for w in jieba.lcut(text) if w.strip() not in STOPWORDS_ZH and w.lower() not in STOPWORDS_EN]
        return re.sub(r"\s{2,}", " ", "".join(pieces)).strip()
    kept = [w for w in text.split() if w.lower().strip(_EDGES) not in STOPWORDS_EN or not w.strip(_EDGES)]
    return " ".join(kept)


_EDGES = ".,!?;:\"'()[]{}"


def _stemmer() -> Any:
    try:
        import snowballstemmer
    except ImportError:
        raise ConfigError("stem: true needs the snowballstemmer package (pip install snowballstemmer)") from None
    return snowballstemmer.stemmer("english")


def prepare_row(row: dict[str, Any], kind: str, prep: TextPrep) -> bool:
    """Prepare a converted row in place; whether any text changed."""
    changed = False
    if kind == "tagging":
        words = [prep.word(w) for w in row["tokens"]]
        changed, row["tokens"] = words != row["tokens"], words
        return changed
    for key in PREPARED.get(kind, ()):
        value = row.get(key)
        if isinstance(value, str) and value:
            new = prep(value)
            changed |= new != value
            row[key] = new
        elif isinstance(value, list):
            new_list = [prep(v) if isinstance(v, str) else v for v in value]
            changed |= new_list != value
            row[key] = new_list
    return changed


# --- augmentation --------------------------------------------------------------------------

def read_synonyms(path: str | None) -> dict[str, list[str]]:
    """word -> the other words of its group(s), from a file of one group per line."""
    if not path:
        return {}
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"augment_synonyms: {path} is not a file; give a text file with one group of "
                          "interchangeable words per line (e.g. `good great fine`)")
    groups: dict[str, list[str]] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        words = [w.strip() for w in re.split(r"[\s,]+", line) if w.strip()]
        for w in words:
            groups.setdefault(w.lower(), []).extend(o for o in words if o.lower() != w.lower())
    return groups


@dataclass(frozen=True)
class Augmenter:
    ops: tuple[str, ...]
    ratio: float
    strength: float
    synonyms: dict[str, list[str]]
    seed: int

    def copies(self, rows: Sequence[dict[str, Any]], kind: str) -> list[tuple[int, dict[str, Any]]]:
        """(index of the source row, augmented copy) pairs: `ratio` copies per row on average."""
        fields = AUGMENTED[kind]
        out = []
        for i, row in enumerate(rows):
            rng = random.Random(f"{self.seed}:{i}")
            n = int(self.ratio) + (rng.random() < self.ratio - int(self.ratio))
            for _ in range(n):
                copy = _copy(row)
                for key in fields:
                    _augment_field(copy, key, lambda text, rng=rng: self.text(text, rng))
                if copy != row:
                    out.append((i, copy))
        return out

    def text(self, text: str, rng: random.Random) -> str:
        words = text.split()
        if len(words) < 2:
            return text
        k = max(1, round(self.strength * len(words)))
        for op in self.ops:
            for _ in range(k):
                words = OPS[op](words, rng, self.synonyms)
        return " ".join(words)


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in row.items()}


def _augment_field(row: dict[str, Any], key: str, change: Callable[[str], str]) -> None:
    value = row.get(key)
    if key == "contents" and isinstance(value, list):  # a conversation: its user turns only
        roles = row.get("roles") or []
        row[key] = [change(v) if i < len(roles) and roles[i] == "user" else v for i, v in enumerate(value)]
    elif isinstance(value, str) and value:
        row[key] = change(value)


def _swap(words: list[str], rng: random.Random, _: dict) -> list[str]:
    i, j = rng.sample(range(len(words)), 2)
    words = list(words)
    words[i], words[j] = words[j], words[i]
    return words


def _delete(words: list[str], rng: random.Random, _: dict) -> list[str]:
    if len(words) < 2:
        return words
    i = rng.randrange(len(words))
    return words[:i] + words[i + 1:]


def _insert(words: list[str], rng: random.Random, synonyms: dict) -> list[str]:
    word = rng.choice(words)
    options = synonyms.get(word.lower())
    new = rng.choice(options) if options else word
    i = rng.randrange(len(words) + 1)
    return words[:i] + [new] + words[i:]


def _synonym(words: list[str], rng: random.Random, synonyms: dict) -> list[str]:
    candidates = [i for i, w in enumerate(words) if synonyms.get(w.lower())]
    if not candidates:
        return words
    i = rng.choice(candidates)
    words = list(words)
    words[i] = rng.choice(synonyms[words[i].lower()])
    return words


OPS = {"swap": _swap, "delete": _delete, "insert": _insert, "synonym": _synonym}
