"""Text generation with the KV cache: greedy or sampled, streaming decoded text as it grows."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from qcompile.runtime import Decoder


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def generate(
    decoder: Decoder, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
    top_p: float = 0.95, seed: int = 0, stop_ids: set[int] = frozenset(),
) -> Iterator[int]:
    """Yield new token ids one at a time: one prefill of the prompt, then 1-token steps on the cache."""
    rng = np.random.default_rng(seed)
    sequence = decoder.sequence(len(prompt_ids) + max_new_tokens)
    logits = sequence.prefill(prompt_ids)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_p, rng)
        if token in stop_ids:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits = sequence.step(token)


def stream_text(tokenizer, prompt_ids: list[int], tokens: Iterator[int], write: Callable[[str], None]) -> list[int]:
    """Decode incrementally and `write` only the newly completed text (multi-byte tokens stay whole)."""
    out: list[int] = []
    shown = ""
    for token in tokens:
        out.append(token)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            write(text[len(shown):])
            shown = text
    return out
