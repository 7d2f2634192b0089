"""The rollout processes of an RL run split across processes (``rl.train_devices`` and
``rl.rollout_devices`` on different processes, ``jaxpt.tasks.rl.placement.process_sides``).

``serve(config)`` is what ``jaxpt.loop.run`` (so ``python -m jaxpt.train``) runs in such a
process: it never builds a train state. It builds the task's rollout source on the rollout
mesh (prompts, tokenizer, sampler, reward functions, ``make_batch``), the policy's graphdef
and its params' shapes and shardings from the architecture alone (``run_spec.abstract_model``,
on the train mesh, whose partition specs the weights keep on the rollout mesh), and the
``PeerLink`` both sides build alike; then ``RolloutServer`` serves the trainer on the fixed
schedule (``jaxpt.tasks.rl.remote``). The weights it samples with all come from the
trainer, version by version.

It writes no checkpoint (the train processes save alone, ``Checkpointer(processes=...)``):
a resumed run restarts it, and it continues from the trainer's restored position (see
``jaxpt.tasks.rl.remote``). Its record, ``rollouts.jsonl`` in the output directory (written by the first rollout
process): per rollout, the version that sampled it and a fingerprint of those weights
(``jaxpt.checkpoint.fingerprint``), to check against the trainer's.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from jaxpt.checkpoint import absolute_path, fingerprint
from jaxpt.run_spec import abstract_model, run_mesh
from jaxpt.sharding import merged_rules, use_rules
from jaxpt.tasks import RunContext, get_task
from jaxpt.tasks.rl.placement import process_sides, rollout_mesh
from jaxpt.tasks.rl.remote import RolloutServer, peer_link

log = logging.getLogger(__name__)


def _on_mesh(tree, mesh):
    """The abstract ``tree`` (leaves sharded on the train mesh) with each leaf's partition
    spec on ``mesh``."""
    from jax.sharding import NamedSharding, PartitionSpec

    def move(x):
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(move, tree)


def serve(config) -> dict:
    """Serve the trainer of ``config``'s run rollouts until it has all it needs or stops.
    Returns ``{"rollouts": sent, "stopped": whether the trainer stopped early, "step": the
    last train step those rollouts fed}``."""
    task = get_task(config.task)
    train_mesh, mesh = run_mesh(config), rollout_mesh(config)
    rules = merged_rules(config.mesh.rules)
    output_dir = absolute_path(config.output_dir)
    ctx = RunContext(config, mesh, rules, output_dir)
    with use_rules(rules):
        graphdef, params, rest, _ = abstract_model(RunContext(config, train_mesh, rules,
                                                              output_dir))
    with jax.set_mesh(mesh), use_rules(rules):
        source = task.make_train_source(ctx)
    first = jax.process_index() == min(process_sides(config)[1])
    record = os.path.join(output_dir, "rollouts.jsonl")
    fingerprints: dict[int, str] = {}

    def on_rollout(index: int, version: int, weights) -> None:
        if version not in fingerprints:
            fingerprints.clear()  # older versions are never sampled with again
            fingerprints[version] = fingerprint(weights)
        if first:
            with open(record, "a") as f:
                f.write(json.dumps({"rollout": index, "version": version,
                                    "weights": fingerprints[version]}) + "\n")

    link = peer_link(train_mesh, mesh)
    server = RolloutServer(link, source, graphdef, _on_mesh(params, mesh),
                           _on_mesh(rest, mesh), on_rollout=on_rollout)
    log.info("rollout process %d: serving the trainer (rollout mesh %s, train mesh %s)",
             jax.process_index(), dict(mesh.shape), dict(train_mesh.shape))
    try:
        sent = server.run()
    finally:
        source.close()
    log.info("rollout process %d: sent %d rollouts%s", jax.process_index(), sent,
             " (the trainer stopped)" if server.stopped else "")
    fed = ((server.start or 0) + sent) * source.reuse
    return {"rollouts": sent, "stopped": server.stopped,
            "step": min(fed, config.train.max_steps) if sent else 0}
