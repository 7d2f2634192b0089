"""The SFT loss, the train step (packing, gradient accumulation, FSDP) and trainer runs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import TINY, sft_overrides
from tolerances import assert_close_to_leaf_scale, assert_params_close_after_adam

from jaxpt.config import load_config
from jaxpt.data import DataError
from jaxpt.data.features import next_token_fields
from jaxpt.loop import run
from jaxpt.models import from_pretrained, init_model
from jaxpt.sharding import make_mesh
from jaxpt.state import create_train_state, shardings_of
from jaxpt.step import StepContext, _sums_and_grads, jit_train_step, make_train_step, put_batch
from jaxpt.tasks.sft import sft_loss
from jaxpt.train import main

pytestmark = pytest.mark.usefixtures("one_device_runs")  # the FSDP test passes its meshes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = os.path.join(ROOT, "configs", "sft_tiny.yaml")


def fast_overrides(output_dir, model_path, **extra):
    return sft_overrides(output_dir, model_path, **{
        "train.log_every": 1, "train.eval_batches": 1, "data.arithmetic.num_test": 8, **extra,
    })


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def random_batch(rng, rows, seq_len, vocab=128, docs_per_row=2):
    """A packed-looking batch: each row holds documents of random length, then padding."""
    batch = {k: np.zeros((rows, seq_len), np.int32) for k in ("input_ids", "target_ids",
                                                                "positions", "segment_ids")}
    batch["loss_mask"] = np.zeros((rows, seq_len), np.float32)
    for r in range(rows):
        start = 0
        for d in range(docs_per_row):
            n = int(rng.integers(4, seq_len // docs_per_row))
            ids = rng.integers(1, vocab, n)
            mask = rng.random(n) < 0.7
            fields = next_token_fields(ids, mask)
            sl = slice(start, start + n)
            for key in ("input_ids", "target_ids", "loss_mask"):
                batch[key][r, sl] = fields[key]
            batch["positions"][r, sl] = np.arange(n)
            batch["segment_ids"][r, sl] = d + 1
            start += n
    return batch


def loss_and_grads(model, batch, k=1):
    state = create_train_state(model, optax.sgd(0.0), make_mesh({}, devices=jax.devices()[:1]))

    @jax.jit
    def f(state, batch):
        out, grads = _sums_and_grads(sft_loss, state, batch, k)
        return out.numerator / out.denominator, jax.tree.map(lambda g: g / out.denominator, grads)

    return f(state, batch)


@pytest.fixture(scope="module")
def tiny_model():
    return init_model(TINY, seed=1)


# ----------------------------------------------------------------------------- the loss


class FixedLogits:
    def __init__(self, logits):
        self.logits = jnp.asarray(logits, jnp.float32)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        return self.logits


def test_sft_loss_matches_hand_computation():
    logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]]])
    batch = {
        "input_ids": np.zeros((1, 3), np.int32), "positions": np.zeros((1, 3), np.int32),
        "segment_ids": np.ones((1, 3), np.int32), "target_ids": np.array([[0, 2, 1]]),
        "loss_mask": np.array([[1.0, 0.0, 1.0]], np.float32),
    }
    out = sft_loss(FixedLogits(logits), batch, StepContext(jax.random.key(0), 0))
    ce0 = -np.log(np.exp(2.0) / np.exp(logits[0, 0]).sum())
    ce2 = -np.log(np.exp(3.0) / np.exp(logits[0, 2]).sum())
    np.testing.assert_allclose(out.numerator, ce0 + ce2, rtol=1e-6)
    assert float(out.denominator) == 2.0
    assert float(out.metrics["token_accuracy"]) == 2.0  # both trained targets are the argmax
    z = sft_loss(FixedLogits(logits), batch, StepContext(jax.random.key(0), 0), z_loss=0.1)
    logz = [np.log(np.exp(logits[0, t]).sum()) for t in (0, 2)]
    np.testing.assert_allclose(z.numerator, ce0 + ce2 + 0.1 * sum(x * x for x in logz), rtol=1e-6)


def test_packed_and_unpacked_give_same_loss_and_grads(tiny_model):
    rng = np.random.default_rng(0)
    seq_len = 32
    docs = []
    for n in (9, 14):
        ids = rng.integers(1, 128, n)
        docs.append(next_token_fields(ids, rng.random(n) < 0.6))
    packed = {k: np.zeros((1, seq_len), np.int32) for k in ("input_ids", "target_ids",
                                                             "positions", "segment_ids")}
    packed["loss_mask"] = np.zeros((1, seq_len), np.float32)
    unpacked = {k: np.zeros((2, seq_len), v.dtype) for k, v in packed.items()}
    start = 0
    for d, fields in enumerate(docs):
        n = len(fields["input_ids"])
        for key in ("input_ids", "target_ids", "loss_mask"):
            packed[key][0, start:start + n] = fields[key]
            unpacked[key][d, :n] = fields[key]
        packed["positions"][0, start:start + n] = np.arange(n)
        packed["segment_ids"][0, start:start + n] = d + 1
        unpacked["positions"][d, :n] = np.arange(n)
        unpacked["segment_ids"][d, :n] = 1
        start += n
    loss_p, grads_p = loss_and_grads(tiny_model, packed)
    loss_u, grads_u = loss_and_grads(tiny_model, unpacked)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)
    # Other batch shapes round differently: ~3e-7 of each leaf's scale here (a flat atol 1e-7
    # was within 1.3x of the embedding's noise); a leak across documents moves them far more.
    assert_close_to_leaf_scale(grads_p, grads_u, rtol=1e-5)


def test_grad_accumulation_equals_full_batch(tiny_model):
    batch = random_batch(np.random.default_rng(1), rows=8, seq_len=32)
    loss_1, grads_1 = loss_and_grads(tiny_model, batch, k=1)
    for k in (2, 4):
        loss_k, grads_k = loss_and_grads(tiny_model, batch, k=k)
        np.testing.assert_allclose(loss_k, loss_1, rtol=1e-6)
        assert_close_to_leaf_scale(grads_k, grads_1, rtol=1e-5)  # as in the packed test


def _two_steps(mesh, batches, k=1):
    with jax.set_mesh(mesh):
        model = init_model(TINY, seed=3, mesh=mesh)
        tx = optax.adamw(1e-2, weight_decay=0.01)
        state = create_train_state(model, tx, mesh)
        step = jit_train_step(make_train_step(sft_loss, tx, k), mesh, shardings_of(state),
                              batches[0])
        losses = []
        for batch in batches:
            state, metrics = step(state, put_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        return state, losses


def test_fsdp_mesh_matches_single_device(mesh8, mesh1):
    rng = np.random.default_rng(2)
    batches = [random_batch(rng, rows=8, seq_len=32) for _ in range(2)]
    state8, losses8 = _two_steps(mesh8, batches)
    state1, losses1 = _two_steps(mesh1, batches, k=2)  # and accumulation on one device
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    # Adam turns a near-zero gradient coordinate's rounding (which differs between the
    # meshes) into a move of up to lr: seen 9e-6 here, so a flat 1e-5 was a coin toss.
    assert_params_close_after_adam(state8.params, state1.params, lr=1e-2, steps=2)
    # Adam moments are sharded exactly like their params.
    up = state8.params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    mu = state8.opt_state[0].mu["model"]["layers"]["mlp"]["up_proj"]["weight"]
    assert up.sharding.spec == mu.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")


# ----------------------------------------------------------------------------- trainer runs


def test_cli_run_of_sft_tiny_writes_everything(tmp_path, tiny_dir):
    out = str(tmp_path / "run")
    args = fast_overrides(out, tiny_dir, **{"train.max_steps": 3, "checkpoint.every": 2})
    assert main(["--config", SFT_TINY, *args, "logging.tensorboard=true"]) == 0
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["lr"] >= 0 for r in train_rows)
    assert any("eval_loss" in r for r in rows) and any("data/examples" in r for r in rows)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2", "3"]
    assert os.listdir(os.path.join(out, "tb"))
    assert os.path.exists(os.path.join(out, "config.yaml"))
    assert os.path.exists(os.path.join(out, "data", "arithmetic_test.jsonl"))
    from transformers import AutoTokenizer

    hf = os.path.join(out, "hf")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.eos_token == "<|im_end|>"
    model = from_pretrained(hf)
    ids = jnp.asarray([tokenizer.encode("What is 1+1?")])
    assert model(ids).shape == (1, ids.shape[1], model.config.vocab_size)


def test_bad_rows_raise_or_are_skipped_and_counted(tmp_path, tiny_dir):
    good = {"messages": [{"role": "user", "content": "What is 1+2?"},
                         {"role": "assistant", "content": "#### 3"}]}
    long = {"prompt": "x" * 10, "completion": "y" * 200}
    rows = [
        good,
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        long,
    ] + [good] * 6
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = fast_overrides(str(tmp_path / "a"), tiny_dir, **{
        "data.train": str(path), "data.eval": "null", "train.max_steps": 1,
        "export.hf": "false",
    })
    with pytest.raises(DataError, match=rf"{path}: row 1 .*unknown role 'wizard'"):
        run(load_config(SFT_TINY, base))
    config = load_config(SFT_TINY, base + ["data.skip_invalid=true",
                                           f"output_dir={tmp_path / 'b'}"])
    result = run(config)
    assert result.step == 1
    data = read_metrics(str(tmp_path / "b"))[0]
    assert data["data/skipped_invalid"] == 3 and data["data/truncated"] == 1
    assert data["data/examples"] == 8
