"""Token-by-token streaming for interactive use (the CLI): the continuous-batching engine
(``jaxpt.sampling.continuous``) with one slot and one decode step per call, so each token
can be shown as soon as it exists. Batch generation runs many steps per call instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax

from jaxpt.sampling.api import bucket, prompt_token_lists
from jaxpt.sampling.config import SamplingConfig
from jaxpt.sampling.continuous import Engine


def stream_tokens(
    model,
    prompt: Sequence[int],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    **sampling,
) -> Iterator[int]:
    """Yield the generated tokens of one prompt as they are produced (eos included).

    ``prompt`` is one prompt in any form ``generate`` accepts (a list of ids, a 1-D array,
    an ``apply_chat_template`` result). Accepts the same sampling arguments as ``generate``
    (``min_p`` and so on, except ``repetition_penalty``, ``stop`` and ``num_samples``).
    """
    rows = prompt_token_lists(prompt)
    if len(rows) != 1 or not rows[0]:
        raise ValueError(f"stream_tokens takes one non-empty prompt, got {len(rows)} prompts")
    prompt = rows[0]
    config = SamplingConfig.make(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        **sampling,
    )
    # Only the filters and eos shape a streamed reply (no penalty, stop or samples).
    config = SamplingConfig.make(
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        min_p=config.min_p, eos_token_id=config.eos_token_ids,
    )
    engine = Engine(model, config, slots=1, max_seq_len=bucket(len(prompt) + max_new_tokens),
                    steps_per_call=1)
    engine.add(prompt, max_new_tokens, jax.random.key(seed))
    sent = 0
    while engine.pending():
        for completion in engine.step():
            yield from completion.tokens[sent:]
            sent = len(completion.tokens)


def stream_text(model, tokenizer, prompt, **sampling) -> Iterator[str]:
    """Yield the reply to one prompt as text pieces, as they are generated.

    Special tokens are dropped. Takes the arguments of ``stream_tokens``.
    """
    tokens, shown, text = [], "", ""
    for token in stream_tokens(model, prompt, **sampling):
        tokens.append(token)
        # Decode the whole reply each time: a token may complete a multi-byte character,
        # and until it does the text ends in U+FFFD, which is held back.
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.startswith(shown) and len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown) :]
