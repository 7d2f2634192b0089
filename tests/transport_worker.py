"""One process of the RL transport test: ``python tests/transport_worker.py DEVICES``.

Process 0 is the rollout side, process 1 the train side, ``DEVICES`` CPU devices each
(``JAXPT_*`` environment variables name the coordinator and this process). Weights go
train -> rollout, train batches rollout -> train, twice each, then a mismatched transfer;
every received array is checked bit-exact here, and one ``RESULT {json}`` line reports.
"""

import json
import os
import sys


def weights(version: int) -> dict:
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(version)
    return {
        "layer": {"w": rng.standard_normal((4, 8)).astype(np.float32),
                  "b": rng.standard_normal(8).astype(ml_dtypes.bfloat16)},
        "step": np.array([version, -version, 2**31 - 1], np.int32),
    }


def batch(i: int) -> tuple[dict, dict]:
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(100 + i)
    arrays = {"tokens": rng.integers(0, 1000, (4, 6), dtype=np.int32),
              "logprobs": rng.standard_normal((4, 6)).astype(np.float32),
              "advantages": rng.standard_normal(4).astype(ml_dtypes.bfloat16)}
    return arrays, {"reward/mean": 0.1 * i, "completion_length/mean": 1 / 3 + i}


def main(devices: int) -> dict:
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxpt.distributed import initialize_distributed
    from jaxpt.sharding import make_mesh
    from jaxpt.tasks.rl.transport import PeerLink

    assert initialize_distributed()
    side = jax.process_index()  # 0: rollout, 1: train
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
    rollout_mesh, train_mesh = (make_mesh({"fsdp": -1}, ds) for ds in by_process)
    link = PeerLink(rollout_mesh, train_mesh)
    mine = set(jax.local_devices())
    # The train side keeps w sharded over fsdp, the rollout side wants it replicated (a
    # reshard on the sender before the permute when there are several devices).
    train_specs = {"layer": {"w": PartitionSpec("fsdp"), "b": PartitionSpec()},
                   "step": PartitionSpec()}
    rollout_specs = {"layer": {"w": PartitionSpec(), "b": PartitionSpec("fsdp")},
                     "step": PartitionSpec()}

    def like_on(mesh, tree, specs):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, s)), tree, specs)

    weights_like = like_on(rollout_mesh, weights(0), rollout_specs)
    batch_specs = {"tokens": PartitionSpec("fsdp"), "logprobs": PartitionSpec("fsdp"),
                   "advantages": PartitionSpec()}
    batch_like = like_on(train_mesh, batch(0)[0], batch_specs)
    result = {"side": side, "compiled": [], "exact": [], "local": [], "metrics": []}

    def check(got, want, like):
        for g, w, lk in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(like)):
            result["exact"].append(np.asarray(g).tobytes() == np.asarray(w).tobytes()
                                   and g.dtype == w.dtype)
            result["local"].append(g.sharding == lk.sharding and g.devices() <= mine)

    for version in (1, 2):
        if side == 1:
            params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(train_mesh, s)),
                                  weights(version), train_specs)
            link.send(params, weights_like)
        else:
            check(link.recv(weights_like), weights(version), weights_like)
        result["compiled"].append(link.last.compiled)
    for i in (1, 2):
        arrays, metrics = batch(i)
        if side == 0:
            link.send_batch(arrays, metrics, batch_like)
        else:
            got, got_metrics = link.recv_batch(batch_like, list(metrics))
            check(got, arrays, batch_like)
            result["metrics"].append(got_metrics == metrics)
        result["compiled"].append(link.last.compiled)
    result["stats"] = [link.last.direction, link.total_bytes]
    # The rollout side expects a different shape: both sides raise, neither hangs.
    wrong = dict(weights_like, step=jax.ShapeDtypeStruct((4,), np.int32, sharding=NamedSharding(
        rollout_mesh, PartitionSpec())))
    try:
        if side == 1:
            link.send(jax.tree.map(lambda x: jax.device_put(x, train_mesh.devices.flat[0]),
                                   weights(3)), weights_like)
        else:
            link.recv(wrong)
        result["mismatch"] = "not raised"
    except ValueError as e:
        result["mismatch"] = str(e)
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(int(sys.argv[1]))), flush=True)
