"""The inference engine: batched, streamed generation with settings per row.

Every reply Lathe generates (chat, predict_with_generate, the API) is a `Sequence`: a
prompt (token ids) and its `Sampling` settings. `decode` runs many of them through ONE
`model.generate` call, left-padded, and still honours each row's own settings: a logits
processor (`_RowSampler`) applies the row's penalties, temperature, top-k and top-p and
draws its token with the row's own seeded generator, handing `generate` a distribution
with all mass on that token; a stopping criterion (`_RowStopper`) then appends it to the
row, decodes the new text, cuts at stop strings, checks max_tokens, cancellation and the
deadline, and streams the new text through the row's callback. Both are the hooks
`generate` offers (`logits_processor`, `stopping_criteria`); nothing of transformers is
patched, and cache, positions, encoder-decoder models and peft adapters stay its business.

Text is streamed so that the pieces joined are exactly the final text: a piece is held
back while it might still change (an unfinished UTF-8 character, trailing blanks, the
beginning of a stop string).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lathe.config.schema import GenerateConfig

# What `on_text` receives: the new text and the log-probabilities of the tokens behind it.
TextCallback = Callable[[str, list["TokenLogprob"]], None]


@dataclass(frozen=True)
class Sampling:
    """How one reply is decoded (the OpenAI request fields, and chat's generate keys)."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # ... and this times how often it was generated
    repetition_penalty: float = 1.0  # transformers': logits of prompt and reply tokens divided by it
    stop: tuple[str, ...] = ()  # strings that end the reply (not included in it)
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely ones
    num_beams: int = 1  # beam search (chat and predict only; no streaming, no per-row settings)
    json_object: bool = False  # the reply is forced to be one JSON object (lathe.infer.jsonmode)
    strip: bool = True  # drop blanks at the start and end of the reply (chat and the API do)
    text: bool = True  # decode the reply as it grows (False: token ids only; predict decodes them itself)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @staticmethod
    def from_generate(gen: GenerateConfig, **changes: Any) -> Sampling:
        """The settings of the generate keys (do_sample false: greedy)."""
        values = dict(max_tokens=gen.max_new_tokens, temperature=gen.temperature if gen.do_sample else 0.0,
                      top_p=gen.top_p, top_k=gen.top_k, repetition_penalty=gen.repetition_penalty,
                      num_beams=gen.num_beams)
        values.update(changes)
        return Sampling(**values)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (id, text, logprob) of the most likely tokens


@dataclass
class Sequence:
    """One reply being generated. The engine fills tokens, text and finish_reason; another
    thread may set `cancelled` (the client went away) at any time."""

    prompt: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    on_text: TextCallback | None = None
    deadline: float | None = None  # time.monotonic() after which the reply stops ("timeout")
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # stop, length, cancelled, timeout
    cancelled: threading.Event = field(default_factory=threading.Event)
    # streaming state
    _emitted: int = 0  # characters of the visible text handed to on_text
    _unsent: int = 0  # logprobs not yet handed over with a piece of text
    _generator: Any = None
    _json: Any = None  # the JSON-object constraint's state

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _visible(self, tokenizer: Any) -> str:
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        return text.lstrip() if self.sampling.strip else text

    def _advance(self, tokenizer: Any) -> None:
        """Decode after a new token: end at a stop string, hand over what can no longer change."""
        if not self.sampling.text:
            return
        text = self._visible(tokenizer)
        cut = _first_stop(text, self.sampling.stop)
        if cut is not None:
            self.text = text[:cut]
            self._finish("stop")
            return
        safe = len(text)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character
            safe = len(text.rstrip("\ufffd"))
        safe -= _partial_stop(text[:safe], self.sampling.stop)
        if self.sampling.strip:  # blanks at the end may turn out to be the end of the reply
            safe = len(text[:safe].rstrip())
        self.text = text
        if safe > self._emitted:
            self._send(text[self._emitted:safe])
            self._emitted = safe

    def _finish(self, reason: str, tokenizer: Any = None) -> None:
        if self.done:
            return
        if tokenizer is not None and self.sampling.text:
            self.text = self._visible(tokenizer)
            cut = _first_stop(self.text, self.sampling.stop)
            self.text = self.text[:cut] if cut is not None else self.text
        if self.sampling.strip:
            self.text = self.text.rstrip()
        self.finish_reason = reason
        rest = self.text[self._emitted:] if len(self.text) >= self._emitted else ""
        self._emitted = len(self.text)
        self._send(rest, last=True)

    def _send(self, text: str, last: bool = False) -> None:
        lps = self.logprobs[self._unsent:]
        if not text and not lps and not last:
            return
        self._unsent = len(self.logprobs)
        if self.on_text is not None and (text or lps):
            self.on_text(text, lps)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could begin a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# --- one generate call over many rows ----------------------------------------------------

class _RowSampler:
    """A logits processor choosing each row's next token with the row's own settings."""

    def __init__(self, seqs: list[Sequence], tokenizer: Any, vocab_size: int) -> None:
        self.seqs = seqs
        self.tokenizer = tokenizer
        self.vocab = vocab_size

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        seqs = self.seqs
        live = [i for i, s in enumerate(seqs) if not s.done]
        logits = scores.float()
        want_lp = [i for i in live if seqs[i].sampling.logprobs is not None]
        logp = torch.log_softmax(logits, dim=-1) if want_lp else None
        for i in live:
            s = seqs[i]
            p = s.sampling
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(s.prompt) | set(s.tokens)), dtype=torch.long, device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and s.tokens:
                counts = torch.bincount(torch.tensor(s.tokens, device=logits.device), minlength=logits.shape[-1])
                counts = counts[:logits.shape[-1]].to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
            if s._json is not None:
                s._json.mask(logits[i], s.tokens, p.max_tokens)
        chosen = logits.argmax(dim=-1)
        for i in live:
            p = seqs[i].sampling
            if p.greedy:
                continue
            chosen[i] = _draw(logits[i], p, seqs[i])
        for i in want_lp:
            seqs[i]._pending_lp = _logprob(logp[i], int(chosen[i]), seqs[i].sampling.logprobs, self.tokenizer)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(seqs), device=scores.device), chosen] = 0.0
        return out


def _draw(logits: Any, p: Sampling, seq: Sequence) -> int:
    import torch

    row = logits / p.temperature
    if p.top_k and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(row, dim=-1), descending=True)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
        row = row.clone()
        row[order[drop]] = float("-inf")
    probs = torch.softmax(row, dim=-1)
    if seq._generator is None:
        seq._generator = torch.Generator(device=probs.device)
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        seq._generator.manual_seed(seed)
    return int(torch.multinomial(probs, 1, generator=seq._generator).item())


def _logprob(logp: Any, token: int, k: int, tokenizer: Any) -> TokenLogprob:
    import torch

    top: tuple[tuple[int, str, float], ...] = ()
    if k:
        vals, ids = torch.topk(logp, min(k, logp.shape[-1]))
        top = tuple((int(t), tokenizer.decode([int(t)]), float(v)) for v, t in zip(vals, ids))
    return TokenLogprob(token, tokenizer.decode([token]), float(logp[token]), top)


class _RowStopper:
    """A stopping criterion that takes each row's new token and says which rows are done."""

    def __init__(self, seqs: list[Sequence], tokenizer: Any, stop_ids: list[int]) -> None:
        self.seqs = seqs
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        last = input_ids[:, -1].tolist()
        now = time.monotonic()
        for s, token in zip(self.seqs, last):
            if s.done:
                continue
            lp = s.__dict__.pop("_pending_lp", None)
            if token in self.stop_ids:
                s._finish("stop", self.tokenizer)
                continue
            s.tokens.append(token)
            if lp is not None:
                s.logprobs.append(lp)
            if s._json is not None:
                s._json.advance(token)
            s._advance(self.tokenizer)
            if s.done:
                continue
            if s._json is not None and s._json.complete:
                s._finish("stop", self.tokenizer)
            elif len(s.tokens) >= s.sampling.max_tokens:
                s._finish("length", self.tokenizer)
            elif s.cancelled.is_set():
                s._finish("cancelled", self.tokenizer)
            elif s.deadline is not None and now > s.deadline:
                s._finish("timeout", self.tokenizer)
        return torch.tensor([s.done for s in self.seqs], dtype=torch.bool, device=input_ids.device)


def start(seqs: list[Sequence], tokenizer: Any, stop_ids: list[int]) -> list[Sequence]:
    """The rows that still need decoding: cancelled ones and max_tokens 0 end here; a
    json_object row gets its constraint."""
    for s in seqs:
        if s.done:
            continue
        if s.cancelled.is_set():
            s._finish("cancelled")
        elif s.sampling.max_tokens <= 0:
            s._finish("length")
        elif s.sampling.json_object and s._json is None:
            from lathe.infer.jsonmode import JsonConstraint

            s._json = JsonConstraint.for_tokenizer(tokenizer, stop_ids)
    return [s for s in seqs if not s.done]


def decode(model: Any, tokenizer: Any, seqs: list[Sequence], stop_ids: list[int]) -> None:
    """Generate every sequence's reply in one `generate` call (beam-search rows one at a time)."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    from lathe.infer.batch import left_pad

    beams = [s for s in seqs if s.sampling.num_beams > 1]
    for s in beams:
        _beam_search(model, tokenizer, s, stop_ids)
    seqs = start([s for s in seqs if s.sampling.num_beams <= 1], tokenizer, stop_ids)
    if not seqs:
        return
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    own = getattr(model, "generation_config", None)
    config = GenerationConfig(
        max_new_tokens=max(s.sampling.max_tokens for s in seqs), do_sample=False, num_beams=1,
        eos_token_id=list(stop_ids) or None, pad_token_id=pad_id,
        bos_token_id=getattr(own, "bos_token_id", None),
        decoder_start_token_id=getattr(own, "decoder_start_token_id", None),
    )
    input_ids, mask = left_pad([s.prompt for s in seqs], pad_id, model.device)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                       logits_processor=LogitsProcessorList([_RowSampler(seqs, tokenizer, vocab)]),
                       stopping_criteria=StoppingCriteriaList([_RowStopper(seqs, tokenizer, stop_ids)]))
    for s in seqs:
        s._finish("length", tokenizer)  # generate stopped at max_new_tokens


def _beam_search(model: Any, tokenizer: Any, s: Sequence, stop_ids: list[int]) -> None:
    import torch

    from lathe.infer.batch import cut_at_stop

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    ids = torch.tensor([s.prompt], device=model.device)
    p = s.sampling
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                             num_beams=p.num_beams, do_sample=False, repetition_penalty=p.repetition_penalty,
                             eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)
    start = 1 if model.config.is_encoder_decoder else ids.shape[1]
    new = out[0, start:].tolist()
    s.tokens = cut_at_stop(new, stop_ids)
    s._finish("stop" if len(s.tokens) < len(new) or len(new) < p.max_tokens else "length", tokenizer)


def generate(model: Any, tokenizer: Any, seqs: list[Sequence], stop_ids: list[int], batch_size: int,
             progress: bool = False) -> list[Sequence]:
    """`decode` in batches of `batch_size` rows of similar length (longest first, so memory
    runs out at once if it will); one row at a time for models that cannot left-pad."""
    from tqdm.auto import tqdm

    from lathe.infer.batch import generation_one_at_a_time

    if batch_size > 1 and generation_one_at_a_time(model):
        batch_size = 1
    order = sorted(seqs, key=lambda s: len(s.prompt), reverse=True)
    bar = tqdm(total=len(seqs), desc="generate", unit="row", disable=not progress, dynamic_ncols=True)
    for k in range(0, len(order), max(1, batch_size)):
        batch = order[k:k + max(1, batch_size)]
        decode(model, tokenizer, batch, stop_ids)
        bar.update(len(batch))
    bar.close()
    return seqs
