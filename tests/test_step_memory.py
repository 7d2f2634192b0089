"""What keeps a train step's memory down: the step donates its state (the new params and
optimizer moments are written over the old, nothing holds the old ones), and the SFT
benchmark reports its peak RSS per phase."""

import jax
import numpy as np
import optax
from tiny import TINY, sft_batch

from jaxpt.bench import RssPhases, compiled_memory
from jaxpt.models import init_model
from jaxpt.state import create_train_state, shardings_of
from jaxpt.step import count_nonfinite, jit_train_step, make_train_step, put_batch
from jaxpt.tasks.sft import sft_loss


def test_the_train_step_donates_its_whole_state(mesh1):
    tx = count_nonfinite(optax.adamw(1e-3))
    with jax.set_mesh(mesh1):
        state = create_train_state(init_model(TINY, seed=0, mesh=mesh1), tx, mesh1)
        batch = sft_batch()
        step = jit_train_step(make_train_step(sft_loss, tx), mesh1, shardings_of(state), batch)
        device_batch = put_batch(batch, mesh1)
        compiled = step.lower(state, device_batch).compile()
        memory = compiled_memory(compiled)
        if memory:  # every params, moments (and counters) buffer is an output's too
            state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
            assert memory["compiled_alias_bytes"] == state_bytes
        old_leaves = jax.tree.leaves((state.params, state.opt_state))
        state, _ = compiled(state, device_batch)
        assert all(x.is_deleted() for x in old_leaves)
        jax.block_until_ready(state)


def test_rss_phases_reports_each_phase_and_the_overall_peak():
    rss = RssPhases()
    rss.end("setup")
    block = np.ones(8 << 20)  # 64 MiB, touched
    rss.end("step")
    del block
    report = rss.report()
    assert set(report) == {"setup_peak_rss_mb", "step_peak_rss_mb"}
    assert all(v > 0 for v in report.values())
    assert rss.peak_mb() >= max(report.values())


def test_release_freed_memory_collects_what_only_cycles_hold():
    import weakref

    from jaxpt.host_memory import release_freed_memory

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle, as NNX module graphs form
    a.payload = np.ones(1024)
    alive = weakref.ref(a)
    del a, b
    release_freed_memory()
    assert alive() is None
