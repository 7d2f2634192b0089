"""The mesh builder and the logical-axis rules table."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpt.sharding import (
    batch_sharding,
    constrain,
    logical_to_spec,
    make_mesh,
    merged_rules,
)


def test_make_mesh_shapes_and_axis_types(mesh8):
    assert dict(mesh8.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert mesh8.axis_types == (AxisType.Auto,) * 4
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert dict(make_mesh({"data": -1, "tensor": 2}).shape) == {
        "data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    assert dict(make_mesh({"data": 2, "expert": 4}).shape) == {
        "data": 2, "fsdp": 1, "expert": 4, "tensor": 1}


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"model": 8}, "unknown mesh axes"),
        ({"data": -1, "fsdp": -1}, "at most one"),
        ({"data": 3}, "needs 3 devices"),
        ({"data": -1, "tensor": 3}, "does not divide"),
    ],
)
def test_make_mesh_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(shape)


def test_logical_to_spec_follows_the_table():
    assert logical_to_spec(("heads", "embed")) == P("tensor", "fsdp")
    batch = ("expert", "data", "fsdp")  # tokens are data-parallel over expert shards too
    assert logical_to_spec(("batch", "seq", "vocab")) == P(batch, None, "tensor")
    assert logical_to_spec(("expert", "mlp", "embed")) == P("expert", "tensor", "fsdp")
    assert logical_to_spec((None, "norm")) == P(None, None)


def test_logical_to_spec_on_a_mesh(mesh8, mesh1):
    # A dimension the mesh axes do not divide is replicated rather than failing.
    assert logical_to_spec(("heads", "embed"), (5, 64), mesh8) == P(None, "fsdp")
    assert logical_to_spec(("batch", None), (2, 4), mesh8) == P(None, None)
    # A mesh axis is used at most once per array.
    assert logical_to_spec(("embed", "batch"), (8, 8), mesh8) == P("fsdp", "data")
    # Size-1 mesh axes are dropped from the spec.
    assert logical_to_spec(("heads", "embed"), (8, 8), mesh1) == P(None, None)


def test_rule_overrides():
    rules = merged_rules({"embed": None, "mlp": ["fsdp", "tensor"]})
    assert rules["mlp"] == ("fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed"), rules=rules) == P(("fsdp", "tensor"), None)


def test_constrain_without_and_with_a_mesh(mesh8):
    x = jnp.ones((8, 4))
    assert constrain(x, ("batch", None)) is x
    with jax.set_mesh(mesh8):
        y = jax.jit(lambda x: constrain(x * 2, ("batch", None)))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh8, P(("data", "fsdp"), None)), 2)
    assert batch_sharding(mesh8, 3).spec == P(("data", "fsdp"), None, None)


def test_config_rules_reach_batches_activations_and_the_sampler(mesh8):
    """``mesh.rules`` overrides (installed with ``use_rules``) change every sharding:
    batches, activation constraints inside jit, and the sampler's batch split."""
    from jaxpt.sharding import batch_shards, use_rules

    assert batch_sharding(mesh8, 2).spec == P(("data", "fsdp"), None)
    assert batch_shards(mesh8) == 4
    with use_rules(merged_rules({"batch": "data", "embed": None})):
        assert batch_sharding(mesh8, 2).spec == P("data", None)
        assert batch_shards(mesh8) == 2

        @jax.jit
        def f(x):
            return constrain(x * 2, ("batch", "embed"))

        with jax.set_mesh(mesh8):
            out = f(jnp.ones((8, 4)))
        assert out.sharding.is_equivalent_to(NamedSharding(mesh8, P("data", None)), 2)
    assert batch_sharding(mesh8, 2).spec == P(("data", "fsdp"), None)  # restored on exit


def test_sampler_programs_follow_the_active_rules(mesh8):
    """The same sampler call under two rule tables compiles twice (rules are part of the
    program), and the output rows are split the way the active table says."""
    import numpy as np
    from tiny import TINY

    from jaxpt.models import init_model
    from jaxpt.sampling import generate
    from jaxpt.sharding import use_rules

    model = init_model(TINY, seed=0, mesh=mesh8)
    prompts = [[1, 2, 3], [4, 5]] * 4
    from jaxpt.sampling.engine import _sample_jit

    default = generate(model, prompts, max_new_tokens=4, mesh=mesh8)
    programs = _sample_jit._cache_size()
    generate(model, prompts, max_new_tokens=4, mesh=mesh8)
    assert _sample_jit._cache_size() == programs  # same rules: the program is reused
    with use_rules(merged_rules({"batch": None})):
        replicated_batch = generate(model, prompts, max_new_tokens=4, mesh=mesh8)
    assert _sample_jit._cache_size() == programs + 1  # another table: its own program
    # Greedy tokens do not depend on how the batch is split.
    np.testing.assert_array_equal(
        np.asarray(default.arrays.tokens_bn), np.asarray(replicated_batch.arrays.tokens_bn)
    )
