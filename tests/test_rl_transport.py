"""jaxpt.tasks.rl.transport: two processes (rollout, train) on gloo CPU collectives move
weights train -> rollout and train batches rollout -> train, bit-exact, onto the receiver's
own devices, compiling each transfer once; a mismatched transfer raises on both sides."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from tiny import free_port, one_device_env, start_processes, wait_processes

from jaxpt.sharding import make_mesh
from jaxpt.tasks.rl.transport import PeerLink

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "transport_worker.py")
TIMEOUT_S = 300


def _launch(devices: int, tmp_path) -> list[dict]:
    """Run the worker on 2 processes of ``devices`` CPU devices each; their RESULT dicts."""
    env = {k: v for k, v in one_device_env().items()
           if not k.startswith("JAXPT_") and k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    env.update(JAXPT_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAXPT_NUM_PROCESSES="2")
    logs = [tmp_path / f"transport{devices}_{i}.log" for i in range(2)]
    started = start_processes([sys.executable, WORKER, str(devices)], env, logs, ROOT)
    texts = wait_processes(started, logs, TIMEOUT_S, "the transport worker", tail=4000)
    return [json.loads(next(line[len("RESULT "):] for line in t.splitlines()
                            if line.startswith("RESULT "))) for t in texts]


@pytest.mark.parametrize("devices", [1, 2])
def test_weights_and_batches_cross_processes_exactly(devices, tmp_path):
    rollout, train = _launch(devices, tmp_path)
    # 3 weight leaves x 2 versions on the rollout side; 3 batch arrays x 2 on the train side
    for side in (rollout, train):
        assert len(side["exact"]) == 6 and all(side["exact"]), side
        assert all(side["local"]), side  # on the receiver's own devices, target sharding
        # a new program for the first weights and the first batch only
        assert side["compiled"] == [True, False, True, False], side
        assert "signature" in side["mismatch"], side
    assert train["metrics"] == [True, True]
    # last: a batch (a->b); 2 x (128 + 16 + 12) weight bytes, 2 x (96 + 96 + 8 + 16) batch
    assert rollout["stats"] == train["stats"] == ["a->b", 2 * 156 + 2 * 216]


def test_peer_link_rejects_what_it_cannot_pair():
    devices = jax.devices()
    with pytest.raises(ValueError, match="same size"):
        PeerLink(make_mesh(devices=devices[:2]), make_mesh(devices=devices[2:6]))
    with pytest.raises(ValueError, match="share devices"):
        PeerLink(make_mesh(devices=devices[:2]), make_mesh(devices=devices[1:3]))
    # One process holding both sides cannot be both sender and receiver of one collective.
    with pytest.raises(ValueError, match="exactly one side"):
        PeerLink(make_mesh(devices=devices[:2]), make_mesh(devices=devices[2:4]))
    assert np.prod(make_mesh(devices=devices[:2]).devices.shape) == 2
