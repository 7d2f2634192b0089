"""Turn validated rows into token ids and a per-token "trained" mask, and fit them to a length.

A mask here is per token: mask[t] is True when token t is something the model should learn to
produce (assistant content and its end-of-turn token, or a plain completion and EOS). The
pipeline later shifts it onto targets.
"""

import os
import re
from typing import Literal

import numpy as np

from jaxpt.data.sources import DataError, RowProblem, check_text
from jaxpt.data.tokenizer import end_of_turn_id

Overflow = Literal["truncate", "drop"]
# Outcome of fitting one example to max_length; the pipeline counts each kind.
Status = Literal["ok", "truncated", "dropped_too_long", "dropped_no_target"]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of plain text, without BOS/EOS."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_id(tokenizer) -> int:
    """The end-of-sequence id appended after plain-text completions."""
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token; plain-text completions need one")
    return int(tokenizer.eos_token_id)


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt; ``tools``
    (JSON schemas, as the OpenAI API sends them) are rendered as the template defines."""
    _require_template(tokenizer)
    extra = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, **extra
    )
    return list(out["input_ids"])


def encode_prompt(tokenizer, prompt, *, chat_template: bool = True,
                  tools: list[dict] | None = None) -> list[int]:
    """Token ids of a generation prompt, the one way jaxpt encodes prompts (RL rollouts,
    evaluation, the generate CLI).

    A message list goes through the chat template with the assistant generation prompt; so
    does a plain string when the tokenizer has a template (as one user message) unless
    ``chat_template=False``. Otherwise the raw text is encoded with the tokenizer's special
    tokens (e.g. BOS), as the model saw text in pretraining.
    """
    try:  # dataset rows are checked on load; this covers prompts typed or built in code
        check_text(prompt, "prompt")
    except RowProblem as problem:
        raise DataError(str(problem)) from None
    if isinstance(prompt, list):
        return render_prompt(tokenizer, prompt, tools)
    if not isinstance(prompt, str):
        raise DataError(
            f"a prompt is a string or a list of chat messages, got {type(prompt).__name__}"
        )
    if chat_template and getattr(tokenizer, "chat_template", None):
        return render_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt)["input_ids"])


def render_with_assistant_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask over assistant content + end-of-turn tokens.

    Templates with `{% generation %}` blocks (like the shipped one) use transformers' own
    assistant mask; other templates fall back to locating each assistant message by rendering
    the conversation prefix before it.
    """
    template = _require_template(tokenizer)
    if _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_char_spans(tokenizer, messages, text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(start < span_end and end > span_start for span_start, span_end in spans))
        for start, end in encoding["offset_mapping"]
    ]
    return list(encoding["input_ids"]), mask


def _assistant_char_spans(tokenizer, messages, text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant message's content plus a directly following end
    of reply: the eos, or the special token the template ends a turn with (Gemma's
    ``<end_of_turn>``, whose eos is another token)."""
    turn_end = end_of_turn_id(tokenizer)
    enders = [tokenizer.eos_token]
    if turn_end is not None:
        enders.append(tokenizer.convert_ids_to_tokens(turn_end))
    enders = [str(e) for e in enders if e]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _text_before_assistant(tokenizer, messages, i)
        content = message["content"]
        start = text.find(content, len(prefix))
        if start < 0 and content.strip() != content:  # templates that trim (Gemma, Llama 3)
            content = content.strip()
            start = text.find(content, len(prefix))
        if not text.startswith(prefix) or start < 0:
            raise DataError(
                "cannot locate assistant turns in this chat template's output; "
                "add {% generation %} blocks to the template"
            )
        end = start + len(content)
        end += next((len(e) for e in enders if text.startswith(e, end)), 0)
        spans.append((start, end))
    return spans


# Two stand-ins for the content of an assistant turn that opens a conversation.
_CONTENT_PROBES = ("\ue000", "\ue001")


def _text_before_assistant(tokenizer, messages, i: int) -> str:
    """What the template renders before assistant message i's content (or a prefix of it).

    After other messages this is the conversation so far with the generation prompt. An
    opening assistant turn has nothing to render that way, and the template may put text
    before it (SmolLM2 inserts a default system prompt): render it with two different contents
    and keep the text they share, so a search for the content cannot land in that text.
    """
    if i:
        return tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
    first, second = (
        tokenizer.apply_chat_template([{**messages[0], "content": probe}], tokenize=False)
        for probe in _CONTENT_PROBES
    )
    return os.path.commonprefix([first, second])


def _require_template(tokenizer) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        raise DataError(
            "tokenizer has no chat template; use plain prompt/completion rows"
        ) from None


def tokenize_sft(
    row: dict, tokenizer, completion_only: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and trained mask (bool) of one normalised SFT row.

    Conversational rows train on assistant turns from `train_from` on; prompt/completion text
    trains on the completion and an appended EOS. `completion_only=False` trains on every token.
    """
    if "messages" in row:
        ids, mask = render_with_assistant_mask(tokenizer, row["messages"])
        if row["train_from"]:
            prompt_ids = render_prompt(tokenizer, row["messages"][: row["train_from"]])
            if ids[: len(prompt_ids)] != prompt_ids:
                raise DataError("chat template does not render the prompt as a prefix")
            mask[: len(prompt_ids)] = [0] * len(prompt_ids)
    else:
        prompt_ids = encode_text(tokenizer, row["prompt"])
        completion_ids = encode_text(tokenizer, row["completion"]) + [eos_id(tokenizer)]
        ids = prompt_ids + completion_ids
        mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    ids_l = np.asarray(ids, np.int32)
    mask_l = np.asarray(mask, bool) if completion_only else np.ones(len(ids), bool)
    return ids_l, mask_l


def fit_sft(
    ids_l: np.ndarray, mask_l: np.ndarray, max_length: int, overflow: Overflow
) -> tuple[np.ndarray, np.ndarray, Status]:
    """Keep the first `max_length` tokens (or drop the example); drop it if nothing is trained."""
    status: Status = "ok"
    if len(ids_l) > max_length:
        if overflow == "drop":
            return ids_l, mask_l, "dropped_too_long"
        ids_l, mask_l, status = ids_l[:max_length], mask_l[:max_length], "truncated"
    # Token 0 is never a target (nothing precedes it), so it cannot carry the loss.
    if not mask_l[1:].any():
        return ids_l, mask_l, "dropped_no_target"
    return ids_l, mask_l, status


def tokenize_preference(row: dict, tokenizer) -> dict:
    """Tokenize the shared prompt once, then each response after it.

    Returns prompt_ids, {chosen,rejected}_ids, {chosen,rejected}_mask (int lists; the mask marks
    response tokens that are trained) and margin.
    """
    return _tokenize_responses(row, tokenizer, ("chosen", "rejected"),
                               {"margin": row["margin"]})


def tokenize_unpaired(row: dict, tokenizer) -> dict:
    """prompt_ids, completion_ids, completion_mask and label of one unpaired row."""
    return _tokenize_responses(row, tokenizer, ("completion",), {"label": row["label"]})


def tokenize_steps(row: dict, tokenizer, separator: str = "\n") -> dict:
    """prompt_ids, completion_ids, completion_mask and completion_labels of a step-labelled
    row: each step is encoded with ``separator`` after it and concatenated; the mask is 1 on
    each step's last token (where its label is read: the model has seen the whole step) and
    the labels hold that step's label there. A message-list prompt goes through the chat
    template with the assistant generation prompt, so the steps sit where a sampled reply
    does; a text prompt is encoded as is."""
    prompt = row["prompt"]
    out = {"prompt_ids": (render_prompt(tokenizer, prompt) if isinstance(prompt, list)
                          else encode_text(tokenizer, prompt))}
    ids, mask, labels = [], [], []
    for step, label in zip(row["completions"], row["labels"]):
        step_ids = encode_text(tokenizer, step + separator)
        if not step_ids:
            continue
        ids += step_ids
        mask += [0] * (len(step_ids) - 1) + [1]
        labels += [0] * (len(step_ids) - 1) + [int(label)]
    out.update(completion_ids=ids, completion_mask=mask, completion_labels=labels)
    return out


def _tokenize_responses(row: dict, tokenizer, sides, out: dict) -> dict:
    if isinstance(row["prompt"], str):
        out["prompt_ids"] = encode_text(tokenizer, row["prompt"])
        for side in sides:
            out[f"{side}_ids"] = encode_text(tokenizer, row[side]) + [eos_id(tokenizer)]
            out[f"{side}_mask"] = [1] * len(out[f"{side}_ids"])
        return out
    prompt_ids = render_prompt(tokenizer, row["prompt"])
    out["prompt_ids"] = prompt_ids
    for side in sides:
        ids, mask = render_with_assistant_mask(tokenizer, row["prompt"] + row[side])
        if ids[: len(prompt_ids)] != prompt_ids:
            raise DataError("chat template does not render the prompt as a prefix")
        response_ids, response_mask = ids[len(prompt_ids) :], mask[len(prompt_ids) :]
        # Drop template text after the last trained token (e.g. the newline after <|im_end|>).
        last = max((i for i, m in enumerate(response_mask) if m), default=-1)
        out[f"{side}_ids"], out[f"{side}_mask"] = (
            response_ids[: last + 1],
            response_mask[: last + 1],
        )
    return out


def fit_preference(
    pair: dict, max_length: int, max_prompt_length: int, overflow: Overflow,
    sides: tuple[str, ...] = ("chosen", "rejected"),
) -> tuple[dict, Status]:
    """Fit prompt + each response (``sides``; an unpaired row's is ``completion``) into
    `max_length`.

    When too long: the prompt keeps its end (left-truncated) down to
    max(max_length - longest response, max_prompt_length) tokens, then responses are cut on the
    right. The prompt/response boundary stays exact.
    """
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length, got {max_prompt_length}")
    prompt = pair["prompt_ids"]
    longest = max(len(pair[f"{side}_ids"]) for side in sides)
    status: Status = "ok"
    if len(prompt) + longest > max_length:
        if overflow == "drop":
            return pair, "dropped_too_long"
        keep = min(len(prompt), max(max_length - longest, max_prompt_length))
        budget = max_length - keep
        pair = dict(pair, prompt_ids=prompt[len(prompt) - keep :])
        for key in [k for k in pair if k.startswith(tuple(f"{side}_" for side in sides))]:
            pair[key] = pair[key][:budget]  # ids, mask and any per-token fields alike
        status = "truncated"
    if not (all(any(pair[f"{side}_mask"]) for side in sides) and pair["prompt_ids"]):
        return pair, "dropped_no_target"
    return pair, status
