"""Data layer: shipped tokenizer, validation errors, chat masks, packing, Grain state."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from jaxpt.data import (
    DataError,
    build_preference_pipeline,
    build_sft_pipeline,
    chat,
    eval_batches,
    generate_examples,
    generate_preference_pairs,
    load_examples,
    load_tokenizer,
    write_jsonl,
)
from jaxpt.data.tokenizer_builder import ASSET_DIR, write_tokenizer_assets

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
ONE_SHARD = {"shard_index": 0, "shard_count": 1}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def trained_text(tok, batch, prefix=""):
    """Decoded targets under the loss mask, row by row."""
    targets, mask = batch[f"{prefix}target_ids"], batch[f"{prefix}loss_mask"]
    return [tok.decode(t[m > 0]) for t, m in zip(targets, mask)]


def documents(batches, prefix=""):
    """(input, target, mask) tuples of every document in packed or padded batches."""
    docs = []
    for batch in batches:
        segments = batch[f"{prefix}segment_ids"]
        for row in range(segments.shape[0]):
            for seg in np.unique(segments[row][segments[row] > 0]):
                where = segments[row] == seg
                docs.append(
                    tuple(
                        tuple(batch[f"{prefix}{key}"][row][where].tolist())
                        for key in ("input_ids", "target_ids", "loss_mask")
                    )
                )
    return docs


# --- tokenizer ---------------------------------------------------------------------------


def test_shipped_tokenizer_loads_offline_and_round_trips(tok):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(ASSET_DIR), local_files_only=True)
    assert len(loaded) == 128 and len(loaded) % 8 == 0
    ids = loaded.convert_tokens_to_ids(["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2, 3]
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 3)
    text = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\tWhat is 347+85?\n#### 432\n"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert len(encoded) == len(text)  # one token per character
    assert tok.decode(encoded) == text
    assert load_tokenizer("jaxpt-tiny").get_vocab() == load_tokenizer(ASSET_DIR).get_vocab()


def test_tokenizer_builder_reproduces_shipped_assets(tmp_path):
    write_tokenizer_assets(tmp_path)
    for shipped in ASSET_DIR.iterdir():
        assert (tmp_path / shipped.name).read_text() == shipped.read_text(), shipped.name


def test_chat_template_is_chatml(tok):
    rendered = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# --- masks -------------------------------------------------------------------------------


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(tok):
    ids, mask = chat.render_with_assistant_mask(tok, CONVERSATION)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|im_end|>4<|im_end|>"
    # Same through the pipeline, where the mask sits on next-token targets.
    pipeline = build_sft_pipeline(
        [{"messages": CONVERSATION}], tok, seq_len=128, batch_size=1, num_epochs=1, **ONE_SHARD
    )
    assert trained_text(tok, next(pipeline)) == ["Hello!<|im_end|>4<|im_end|>"]


def test_prefix_render_fallback_matches_generation_blocks(tok):
    plain = load_tokenizer()
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    assert chat.render_with_assistant_mask(plain, CONVERSATION) == (
        chat.render_with_assistant_mask(tok, CONVERSATION)
    )


def test_prompt_completion_rows_train_on_completion_only(tok):
    rows = [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": CONVERSATION[:3] + [CONVERSATION[3]], "completion": [CONVERSATION[4]]},
    ]
    pipeline = build_sft_pipeline(
        rows,
        tok,
        seq_len=128,
        batch_size=2,
        num_epochs=1,
        shuffle=False,
        packing=False,
        **ONE_SHARD,
    )
    # Plain text: completion + EOS. TRL-style lists: only the completion's assistant turn.
    assert trained_text(tok, next(pipeline)) == ["4<|im_end|>", "4<|im_end|>"]
    everything = build_sft_pipeline(
        rows[:1], tok, seq_len=16, batch_size=1, num_epochs=1, completion_only=False, **ONE_SHARD
    )
    assert trained_text(tok, next(everything)) == ["+2=4<|im_end|>"]  # all but the first token


# --- validation --------------------------------------------------------------------------

GOOD_SFT = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
GOOD_PAIR = {"prompt": "q", "chosen": "yes", "rejected": "no"}
BAD_ROWS = [
    ("sft", {"text": "hello"}, "needs a 'messages' field"),
    ("sft", {"messages": [{"role": "user", "content": 3}]}, "content' must be a string"),
    ("sft", {"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ("sft", {"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ("sft", {"prompt": "x", "completion": [GOOD_SFT["messages"][1]]}, "both be strings"),
    ("sft", "not an object", "expected a JSON object"),
    ("preference", {"prompt": "q", "chosen": "a"}, "missing field(s) 'rejected'"),
    ("preference", dict(GOOD_PAIR, margin="big"), "'margin' must be a finite number"),
    ("preference", dict(GOOD_PAIR, chosen=[{"role": "user", "content": "x"}]), "all be strings"),
]


@pytest.mark.parametrize("kind,bad_row,expected", BAD_ROWS)
def test_bad_row_names_file_and_row_or_is_skipped(tmp_path, kind, bad_row, expected):
    good = GOOD_SFT if kind == "sft" else GOOD_PAIR
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bad_row, good])
    with pytest.raises(DataError) as error:
        load_examples(path, kind)
    assert str(path) in str(error.value) and "row 2" in str(error.value)
    assert expected in str(error.value)
    loaded = load_examples(path, kind, skip_invalid=True)
    assert (loaded.num_read, loaded.num_skipped, len(loaded.rows)) == (4, 1, 3)


def test_invalid_json_line_and_skip_counts_in_pipeline(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(GOOD_SFT), "{oops", json.dumps(GOOD_SFT)]) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl: row 1 \(line 2\): invalid JSON"):
        build_sft_pipeline(path, tok, seq_len=32, batch_size=1, **ONE_SHARD)
    pipeline = build_sft_pipeline(
        path, tok, seq_len=32, batch_size=1, skip_invalid=True, **ONE_SHARD
    )
    assert pipeline.stats.skipped_invalid == 1 and pipeline.stats.examples == 2


def test_loads_json_and_parquet_files(tmp_path):
    import datasets

    rows = generate_examples(5, seed=0)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.json", "a.parquet"):
        loaded = load_examples(tmp_path / name)
        assert [r["messages"] for r in loaded.rows] == [r["messages"] for r in rows]
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")


# --- truncation --------------------------------------------------------------------------


def test_truncate_and_drop_counters(tok):
    short = {"prompt": "q", "completion": "a"}
    long_answer = {"prompt": "q", "completion": "x" * 40}
    long_prompt = {"prompt": "q" * 40, "completion": "a"}
    rows = [short, long_answer, long_prompt]
    kwargs = dict(seq_len=32, batch_size=4, num_epochs=1, **ONE_SHARD)
    kept = build_sft_pipeline(rows, tok, overflow="truncate", **kwargs)
    # The long answer is cut to 32 tokens; the long prompt loses its whole completion.
    assert (kept.stats.truncated, kept.stats.dropped_no_target, kept.stats.examples) == (1, 1, 2)
    assert sorted((next(kept)["segment_ids"] > 0).sum(axis=1).tolist()) == [0, 0, 3, 32]
    dropped = build_sft_pipeline(rows, tok, overflow="drop", **kwargs)
    assert (dropped.stats.dropped_too_long, dropped.stats.truncated, dropped.stats.examples) == (
        2,
        0,
        1,
    )


def test_preference_truncation_keeps_prompt_end_and_boundary(tok):
    pair = {
        "prompt": [{"role": "user", "content": "z" * 60 + "END"}],
        "chosen": [{"role": "assistant", "content": "c" * 30}],
        "rejected": [{"role": "assistant", "content": "r" * 5}],
    }
    kwargs = dict(seq_len=48, batch_size=1, num_epochs=1, **ONE_SHARD)
    pipeline = build_preference_pipeline([pair], tok, max_prompt_length=20, **kwargs)
    batch = next(pipeline)
    assert pipeline.stats.truncated == 1
    # The prompt keeps its last 20 tokens (so the generation prompt survives); the longer
    # response keeps its first 28 = 48 - 20.
    chosen_ids = batch["chosen_input_ids"][0]
    assert tok.decode(chosen_ids[:20]) == "zzzzEND<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(chosen_ids[20:]) == "c" * 28
    assert trained_text(tok, batch, "chosen_") == ["c" * 28]
    assert trained_text(tok, batch, "rejected_") == ["rrrrr<|im_end|>"]
    dropped = build_preference_pipeline([pair, GOOD_PAIR], tok, overflow="drop", **kwargs)
    assert (dropped.stats.dropped_too_long, dropped.stats.examples) == (1, 1)


# --- packing and batches -----------------------------------------------------------------


def test_packed_and_unpacked_give_same_documents_and_counts(tok):
    rows = generate_examples(40, seed=1)
    kwargs = dict(seq_len=160, batch_size=4, num_epochs=1, seed=3, **ONE_SHARD)
    packed = list(build_sft_pipeline(rows, tok, packing=True, **kwargs))
    padded = list(build_sft_pipeline(rows, tok, packing=False, **kwargs))
    assert len(packed) < len(padded) == 10
    assert collections.Counter(documents(packed)) == collections.Counter(documents(padded))
    for key in ("loss_mask", "segment_ids"):
        assert sum((b[key] > 0).sum() for b in packed) == sum((b[key] > 0).sum() for b in padded)
    batch = packed[0]
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "input_ids": ("int32", (4, 160)),
        "target_ids": ("int32", (4, 160)),
        "loss_mask": ("float32", (4, 160)),
        "positions": ("int32", (4, 160)),
        "segment_ids": ("int32", (4, 160)),
    }
    # Positions restart per document; targets are the next token of the same document.
    for row in range(4):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert batch["positions"][row][where].tolist() == list(range(len(where)))
            inputs, targets = batch["input_ids"][row][where], batch["target_ids"][row][where]
            assert targets[:-1].tolist() == inputs[1:].tolist() and targets[-1] == 0


def test_epochs_are_reshuffled_and_shards_partition_rows(tok):
    rows = generate_examples(12, seed=2)
    kwargs = {"seq_len": 64, "batch_size": 1, "packing": False, "seed": 5}
    two_epochs = list(build_sft_pipeline(rows, tok, num_epochs=2, **ONE_SHARD, **kwargs))
    order = [b["input_ids"][0].tobytes() for b in two_epochs]
    assert set(order[:12]) == set(order[12:]) and len(set(order)) == 12
    assert order[:12] != order[12:]
    shards = [
        {
            b["input_ids"][0].tobytes()
            for b in build_sft_pipeline(
                rows, tok, num_epochs=1, shard_index=i, shard_count=2, **kwargs
            )
        }
        for i in range(2)
    ]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(order)


@pytest.mark.parametrize("packing", [True, False])
def test_iterator_state_restores_identical_batches(tok, packing):
    rows = generate_examples(30, seed=4)
    kwargs = dict(seq_len=64, batch_size=3, seed=7, packing=packing, **ONE_SHARD)
    pipeline = build_sft_pipeline(rows, tok, **kwargs)
    for _ in range(5):  # past the first epoch boundary for the unpacked case
        next(pipeline)
    state = pipeline.get_state()
    expected = [next(pipeline) for _ in range(8)]
    pipeline.set_state(state)
    again = [next(pipeline) for _ in range(8)]
    fresh = build_sft_pipeline(rows, tok, **kwargs)
    fresh.set_state(json.loads(json.dumps(state)))  # state survives JSON, as checkpoints store it
    restored = [next(fresh) for _ in range(8)]
    for a, b, c in zip(expected, again, restored):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], c[key])


def test_eval_batches_are_fixed_in_number_and_order(tok):
    rows = generate_examples(10, seed=0, split="test")
    kwargs = {"seq_len": 64, "batch_size": 4, "num_epochs": 1, "shuffle": False, "packing": False}
    first = eval_batches(build_sft_pipeline(rows, tok, **ONE_SHARD, **kwargs), num_batches=4)
    second = eval_batches(build_sft_pipeline(rows, tok, **ONE_SHARD, **kwargs), num_batches=4)
    assert len(first) == 4
    assert (first[2]["segment_ids"][2:] == 0).all()  # 10 rows: last batch is padded
    assert (first[3]["loss_mask"] == 0).all()  # filler batch
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(first, second))
    assert tok.decode(first[0]["input_ids"][0]).startswith(
        "<|im_start|>user\n" + rows[0]["messages"][0]["content"]
    )


# --- preference pairs --------------------------------------------------------------------


def test_preference_masks_exclude_prompt_tokens(tok):
    pairs = generate_preference_pairs(6, seed=0) + [dict(GOOD_PAIR, margin=1.5)]
    pipeline = build_preference_pipeline(
        pairs, tok, seq_len=80, batch_size=7, num_epochs=1, shuffle=False, **ONE_SHARD
    )
    batch = next(pipeline)
    assert batch["margin"].tolist() == [0.0] * 6 + [1.5]
    assert batch["pair_mask"].tolist() == [1.0] * 7
    assert batch["chosen_input_ids"].shape == batch["rejected_loss_mask"].shape == (7, 80)
    for side in ("chosen", "rejected"):
        texts = trained_text(tok, batch, f"{side}_")
        for pair, text in zip(pairs[:6], texts):
            assert text == pair[side][0]["content"] + "<|im_end|>"
        assert texts[6] == GOOD_PAIR[side] + "<|im_end|>"
        prompt_len = len(chat.render_prompt(tok, pairs[0]["prompt"]))
        first_target = np.flatnonzero(batch[f"{side}_loss_mask"][0])[0]
        assert first_target == prompt_len - 1  # predicts the first response token
        # Chosen and rejected share the prompt tokens exactly.
        np.testing.assert_array_equal(
            batch["chosen_input_ids"][:6, :prompt_len], batch[f"{side}_input_ids"][:6, :prompt_len]
        )


def test_preference_state_restores_identical_batches(tok):
    pairs = generate_preference_pairs(9, seed=1)
    kwargs = dict(seq_len=64, batch_size=2, seed=1, **ONE_SHARD)
    pipeline = build_preference_pipeline(pairs, tok, **kwargs)
    next(pipeline)
    state = pipeline.get_state()
    expected = [next(pipeline) for _ in range(6)]
    fresh = build_preference_pipeline(pairs, tok, **kwargs)
    fresh.set_state(state)
    for a, b in zip(expected, (next(fresh) for _ in range(6))):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_worker_processes_give_checkpointable_batches(tok):
    rows = generate_examples(24, seed=6)
    pipeline = build_sft_pipeline(
        rows, tok, seq_len=64, batch_size=2, num_workers=1, seed=0, **ONE_SHARD
    )
    try:
        next(pipeline)
        state = pipeline.get_state()
        expected = [next(pipeline)["input_ids"].copy() for _ in range(3)]
        pipeline.set_state(state)
        assert all((e == next(pipeline)["input_ids"]).all() for e in expected)
    finally:
        pipeline.close()


def test_written_jsonl_round_trips(tmp_path):
    rows = generate_preference_pairs(3, seed=0)
    path = write_jsonl(Path(tmp_path) / "sub" / "pairs.jsonl", rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert len(load_examples(path, "preference").rows) == 3
