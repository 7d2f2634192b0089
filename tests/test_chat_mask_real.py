"""Assistant-only SFT masks and loss on a real model's real template (SmolLM2-135M-Instruct).

SmolLM2's ChatML template has no {% generation %} blocks, so jaxpt masks it with the
prefix-render fallback. Each expectation here is computed another way: the ChatML token
sequence is built turn by turn, the mask is cross-checked against transformers'
generation-block mask, and the loss is recomputed in numpy and by transformers' Llama from
the same weights.
"""

import numpy as np
import pytest
from smollm2 import smollm2_tokenizer

from jaxpt.data import build_sft_pipeline, chat, features

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = {
    "system_two_turns": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    "default_system": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    # The replies also occur earlier (in a user turn, in the default system prompt, in the
    # "assistant" role name), where a search from the start of the text would find them.
    "echoed_content": [
        {"role": "user", "content": 'Repeat after me: "trained by Hugging Face"'},
        {"role": "assistant", "content": "trained by Hugging Face"},
        {"role": "user", "content": "Now just: assistant"},
        {"role": "assistant", "content": "assistant"},
    ],
    "whitespace_unicode": [
        {"role": "system", "content": "Réponds en français.\n"},
        {"role": "user", "content": "  Café?  "},
        {"role": "assistant", "content": " Oui, un café ☕ s'il vous plaît.\n\n- naïve\n- 日本語 🙂  "},
        {"role": "user", "content": "\nEncore\n"},
        {"role": "assistant", "content": "Bien sûr !\n"},
    ],
    # A leading newline merges with the header's "\n" into one token that is partly template
    # and partly reply; it counts as trained, as in transformers' generation-block mask.
    "leading_newline": [
        {"role": "user", "content": "List two."},
        {"role": "assistant", "content": "\n\n1. a\n2. b"},
        {"role": "user", "content": "Again, indented."},
        {"role": "assistant", "content": "   1. a"},
    ],
    "empty_replies": [
        {"role": "system", "content": "Say nothing."},
        {"role": "user", "content": "Anything?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Still nothing?"},
        {"role": "assistant", "content": " "},
    ],
    # The template inserts its default system prompt before an opening assistant turn too.
    "assistant_first": [
        {"role": "assistant", "content": "You"},
        {"role": "user", "content": "Me?"},
        {"role": "assistant", "content": "a"},
    ],
}
NAMES = list(CONVERSATIONS)

# SmolLM2's template with its assistant content + <|im_end|> wrapped in a generation block.
TAGGED_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": 256, "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def expected(tok):
    """{name: (ids, mask)} built turn by turn, for every conversation."""
    return {name: chatml_ids_and_mask(tok, messages) for name, messages in CONVERSATIONS.items()}


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def chatml_ids_and_mask(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """SmolLM2's ChatML token ids and assistant mask, built turn by turn.

    <|im_start|> and <|im_end|> are special tokens, so the text between them tokenizes on its
    own: ``role\\ncontent`` in each turn and the ``\\n`` after it. An assistant turn is trained
    from the first token that its content changes (compared with the bare ``role\\n``)
    through its <|im_end|>.
    """
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    ids, mask = [], []
    for message in messages:
        header = _encode(tok, message["role"] + "\n")
        body = _encode(tok, message["role"] + "\n" + message["content"])
        shared = next(
            (k for k, (a, b) in enumerate(zip(header, body)) if a != b), min(len(header), len(body))
        )
        trained = int(message["role"] == "assistant")
        ids += [im_start, *body, im_end, *_encode(tok, "\n")]
        mask += [0] * (1 + shared) + [trained] * (len(body) - shared) + [trained, 0]
    return ids, mask


# --- the mask ----------------------------------------------------------------------------


def test_smollm2_template_has_no_generation_blocks(tok):
    assert tok.eos_token == "<|im_end|>"
    assert not chat._GENERATION_TAG.search(tok.get_chat_template())
    assert DEFAULT_SYSTEM in tok.get_chat_template()


@pytest.mark.parametrize("name", NAMES)
def test_fallback_mask_matches_turn_by_turn_chatml(tok, expected, name):
    ids, mask = expected[name]
    rendered = tok.apply_chat_template(CONVERSATIONS[name], tokenize=True, return_dict=True)
    assert ids == list(rendered["input_ids"])
    assert chat.render_with_assistant_mask(tok, CONVERSATIONS[name]) == (ids, mask)
    # The same mask that transformers derives from generation blocks in this template.
    tagged = tok.apply_chat_template(
        CONVERSATIONS[name], chat_template=TAGGED_TEMPLATE, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert (list(tagged["input_ids"]), list(tagged["assistant_masks"])) == (ids, mask)


def test_trained_text_is_each_reply_and_its_im_end(tok, expected):
    for name in ("system_two_turns", "echoed_content", "whitespace_unicode", "assistant_first"):
        ids, mask = expected[name]
        replies = [m["content"] for m in CONVERSATIONS[name] if m["role"] == "assistant"]
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        assert trained == "".join(reply + "<|im_end|>" for reply in replies), name
    # A token shared by the header's newline and a reply's leading whitespace is trained.
    ids, mask = expected["leading_newline"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "\n\n\n1. a\n2. b<|im_end|>\n   1. a<|im_end|>"


# --- the SFT features --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_sft_features_weight_exactly_the_assistant_targets(tok, expected, name):
    ids, mask = expected[name]
    ids_l, mask_l = chat.tokenize_sft({"messages": CONVERSATIONS[name], "train_from": 0}, tok)
    ids_l, mask_l, status = chat.fit_sft(ids_l, mask_l, len(ids), "truncate")
    assert status == "ok"
    fields = features.next_token_fields(ids_l, mask_l)
    assert fields["input_ids"].tolist() == ids
    # Position t predicts token t + 1, so it carries weight exactly when token t + 1 is trained.
    assert fields["target_ids"].tolist() == ids[1:] + [0]
    assert fields["loss_mask"].tolist() == mask[1:] + [0]
    # Truncation keeps the mask of the kept tokens.
    cut_ids, cut_mask, status = chat.fit_sft(ids_l, mask_l, len(ids) - 3, "truncate")
    assert status == "truncated"
    assert (cut_ids.tolist(), cut_mask.tolist()) == (ids[:-3], [bool(m) for m in mask[:-3]])


def test_prompt_completion_conversation_trains_on_the_completion_only(tok, expected):
    messages = CONVERSATIONS["system_two_turns"]
    ids, mask = expected["system_two_turns"]
    last_turn = len(ids) - 1 - ids[::-1].index(tok.convert_tokens_to_ids("<|im_start|>"))
    final_only = [m if t > last_turn else 0 for t, m in enumerate(mask)]
    pipeline = build_sft_pipeline(
        [{"prompt": messages[:-1], "completion": messages[-1:]}], tok, seq_len=len(ids),
        batch_size=1, num_epochs=1, shuffle=False, packing=False, shard_index=0, shard_count=1,
    )
    batch = next(pipeline)
    assert batch["loss_mask"][0].tolist() == final_only[1:] + [0]
    assert tok.decode(batch["target_ids"][0][batch["loss_mask"][0] > 0]) == "Rome.<|im_end|>"


# --- the loss ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama on SmolLM2's vocabulary, and its HF checkpoint."""
    from jaxpt.models import init_model, save_pretrained

    model = init_model(TINY_SMOLLM2, seed=0)
    # At init every token costs about log(vocab); larger (tied) embeddings spread the
    # per-token losses, so that a misplaced mask visibly changes the loss.
    embed = model.model.embed_tokens.weight
    embed[...] = embed[...] * 30.0
    path = str(tmp_path_factory.mktemp("tiny_smollm2"))
    save_pretrained(model, path)
    return model, path


@pytest.fixture(scope="module")
def packed(tok, expected, model_dir):
    """Every conversation packed into one row by the SFT pipeline, jaxpt's SFT loss sums on
    it, and the model's logits."""
    import jax
    from flax import nnx

    from jaxpt.step import StepContext
    from jaxpt.tasks.sft import sft_loss

    rows = [{"messages": CONVERSATIONS[name]} for name in NAMES]
    seq_len = sum(len(expected[name][0]) for name in NAMES)
    batch = next(
        build_sft_pipeline(
            rows, tok, seq_len=seq_len, batch_size=1, num_epochs=1, shuffle=False,
            shard_index=0, shard_count=1,
        )
    )
    graphdef, state = nnx.split(model_dir[0])
    ctx = StepContext(rng=jax.random.key(0), step=np.int32(0))

    @jax.jit
    def run(state, batch):
        model = nnx.merge(graphdef, state)
        out = sft_loss(model, batch, ctx)
        logits_btv = model(
            batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        return out.numerator, out.denominator, logits_btv

    numerator, denominator, logits_btv = run(state, batch)
    return {
        "batch": batch, "loss": float(numerator) / float(denominator),
        "tokens": float(denominator), "logits_tv": np.asarray(logits_btv[0]),
    }


def _mean_nll(packed, expected, shift: int = 0) -> tuple[float, int]:
    """Mean NLL of the packed row's documents over tokens t with expected mask[t - shift]
    (shift=0: the trained tokens), each predicted from position t - 1, in float64."""
    segments = packed["batch"]["segment_ids"][0]
    nll, count = 0.0, 0
    for index, name in enumerate(NAMES):
        ids, mask = expected[name]
        where = np.flatnonzero(segments == index + 1)
        assert packed["batch"]["input_ids"][0][where].tolist() == ids
        for t in range(1 + shift, len(ids)):
            if mask[t - shift]:
                logits_v = packed["logits_tv"][where[t - 1]].astype(np.float64)
                top = logits_v.max()
                nll += top + np.log(np.exp(logits_v - top).sum()) - logits_v[ids[t]]
                count += 1
    return nll / count, count


def test_sft_loss_is_mean_nll_over_exactly_the_assistant_tokens(packed, expected):
    loss, count = _mean_nll(packed, expected)
    assert packed["tokens"] == count
    np.testing.assert_allclose(packed["loss"], loss, rtol=1e-6)
    # The check is sharp: weighting positions whose input (not target) is trained is far off.
    off_by_one, _ = _mean_nll(packed, expected, shift=1)
    assert abs(off_by_one - loss) > 1e-3 * loss


def test_sft_loss_matches_torch_cross_entropy_with_ignore_index(packed, expected, model_dir):
    import torch
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(model_dir[1], dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in (expected[name] for name in NAMES):
            labels = torch.tensor([[i if m else -100 for i, m in zip(ids, mask)]])
            out = hf_model(torch.tensor([ids]), labels=labels)
            # Logits at t against labels at t + 1, as transformers' own causal-LM loss does.
            doc_nll = torch.nn.functional.cross_entropy(
                out.logits[0, :-1].double(), labels[0, 1:], ignore_index=-100, reduction="sum"
            ).item()
            doc_count = sum(mask[1:])
            np.testing.assert_allclose(out.loss.item(), doc_nll / doc_count, rtol=1e-5)
            nll, count = nll + doc_nll, count + doc_count
    # Each conversation alone in transformers equals jaxpt's loss on them packed together.
    np.testing.assert_allclose(packed["loss"], nll / count, rtol=1e-5)
