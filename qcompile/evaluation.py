"""The pinned evaluation protocol: WikiText-2 perplexity, argmax agreement, prefill/decode latency.

Perplexity: the WikiText-2 test text (shipped in the package) tokenized as one string, cut into
non-overlapping windows of 512 tokens; the first N windows (default 128) are scored, each from an empty
KV cache, on its 511 next-token predictions. Latency: a 512-token prefill, then 1-token decode steps with
the KV cache; after a warm-up, the best of 3 rounds (median per decode token), CPU execution provider.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import statistics
import time

import numpy as np

from qcompile import errors
from qcompile.runtime import Decoder, load_tokenizer

SEQ_LEN = 512
DEFAULT_WINDOWS = 128
PROTOCOL = "wikitext-2 test, non-overlapping 512-token windows, first N, ORT CPU fp32 logits"


def wikitext(split: str = "test") -> str:
    return (importlib.resources.files("qcompile") / "data" / "wikitext-2" / f"{split}.txt").read_text(encoding="utf-8")


def leading_ids(tokenizer, text: str, needed: int) -> np.ndarray:
    """The token ids of `text`, at least its first `needed` ones, as encoding all of it gives them: a prefix of
    about twice the characters they take is encoded first (the ids before its last few words cannot depend on
    what follows), and the whole text only if that prefix falls short."""
    chars = 8 * (needed + _PREFIX_MARGIN)
    if len(text) > chars:
        ids = tokenizer.encode(text[:chars]).ids
        if len(ids) >= needed + _PREFIX_MARGIN:
            return np.array(ids[: needed], dtype=np.int64)
    return np.array(tokenizer.encode(text).ids, dtype=np.int64)


_PREFIX_MARGIN = 256  # tokens past the last needed one, so that the cut word is not among them


def windows(tokenizer, count: int, seq_len: int = SEQ_LEN) -> np.ndarray:
    """[count, seq_len] token ids: the first `count` non-overlapping windows of the test text."""
    ids = leading_ids(tokenizer, wikitext("test"), count * seq_len)
    if len(ids) < count * seq_len:
        raise errors.InputError(f"--windows {count} is more than the {len(ids) // seq_len} windows the test text has")
    return ids[: count * seq_len].reshape(count, seq_len)


@dataclasses.dataclass
class Perplexity:
    ppl: float
    tokens: int
    windows: int
    predictions: np.ndarray  # argmax next-token id at every scored position, for agreement

    def to_dict(self) -> dict:
        return {"ppl": round(self.ppl, 4), "tokens": self.tokens, "windows": self.windows, "seq_len": SEQ_LEN,
                "protocol": PROTOCOL}


def perplexity(decoder: Decoder, tokenizer, count: int = DEFAULT_WINDOWS, progress=None, label: str = "") -> Perplexity:
    batches = windows(tokenizer, count)
    advance = progress.task(f"Perplexity {label}".strip(), count) if progress else (lambda: None)
    nll, predictions = 0.0, []
    for window in batches:
        logits, _ = decoder.forward(window[None], decoder.empty_cache(), 0)
        nll += float(token_nll(logits[0, :-1], window[1:]).sum())
        predictions.append(logits[0, :-1].argmax(axis=-1))
        advance()
    tokens = count * (SEQ_LEN - 1)
    return Perplexity(float(np.exp(nll / tokens)), tokens, count, np.concatenate(predictions))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """−log p(target) at each position of `logits` [s, vocab] (exp in float32, each term in (0, 1]; sums in float64)."""
    logits = logits.astype(np.float32, copy=False)
    peak = logits.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
    return logsumexp - logits[np.arange(len(targets)), targets]


def position_nll(decoder: Decoder, ids: np.ndarray, chunk: int = SEQ_LEN) -> np.ndarray:
    """−log p(ids[t + 1] | ids[:t + 1]) for every t of one long sequence, fed `chunk` tokens at a time into the
    growing cache: what a long conversation's later tokens cost (the evaluation and calibration windows stop at
    512 tokens, so positions past them are where a quantized cache's scales were never measured)."""
    cache, out = decoder.empty_cache(), []
    for start in range(0, len(ids) - 1, chunk):
        logits, cache = decoder.forward(ids[None, start:start + chunk], cache, start)
        targets = ids[start + 1:start + chunk + 1]
        out.append(token_nll(logits[0, :len(targets)], targets))
    return np.concatenate(out)


def latency(decoder: Decoder, prompt_len: int = SEQ_LEN, decode_steps: int = 32, rounds: int = 3) -> dict:
    """Prefill ms for `prompt_len` tokens, best of two prefills (the first also warms the session), and median ms
    per decode token after it, best of `rounds` runs of `decode_steps` steps continuing one sequence.

    The best is reported because interference from other processes only ever adds time; a median is not moved
    by a round's first, cold step.
    """
    ids = np.random.default_rng(0).integers(0, min(1000, decoder.vocab_size or 1000), size=(prompt_len,))
    prefill = []
    for length in (prompt_len + 1, prompt_len + rounds * decode_steps):  # the second continues into the rounds
        sequence = decoder.sequence(length)
        start = time.perf_counter()
        logits = sequence.prefill(ids)
        prefill.append(time.perf_counter() - start)
    decode = []
    for _ in range(rounds):
        steps = []
        for _ in range(decode_steps):
            start = time.perf_counter()
            logits = sequence.step(int(logits.argmax()))
            steps.append(time.perf_counter() - start)
        decode.append(statistics.median(steps))
    return {
        "prefill_ms": round(1000 * min(prefill), 2),
        "decode_ms_per_token": round(1000 * min(decode), 2),
        "prompt_len": prompt_len,
        "decode_steps": decode_steps,
    }


def evaluate_model(path, count: int = DEFAULT_WINDOWS, with_latency: bool = True, progress=None,
                   label: str = "", session_config: dict | None = None) -> tuple[Perplexity, dict]:
    decoder = Decoder(path, session_config)
    tokenizer = load_tokenizer(decoder.path.parent)
    ppl = perplexity(decoder, tokenizer, count, progress, label)
    return ppl, (latency(decoder) if with_latency else {})
