"""What the RL tasks (GRPO, PPO) share, one job per module:

- ``rewards``: reward settings and the scoring step (shared with rejection sampling);
- ``batch``: a rollout's rows on the host and the train-batch layout the losses read;
- ``forward``: the loss-side forward over a train batch's completion positions;
- ``program``: a jitted program run on a rollout's batch (PPO's and GRPO's finishers);
- ``source``: ``RolloutSource``, the BatchSource that samples, scores and packs rollouts;
- ``evaluator``: greedy held-out accuracy of the policy;
- ``transport``: ``PeerLink``, weights and train batches between the rollout and train
  processes of an asynchronous run (one collective over both device sets);
- ``remote``: the protocol of a run whose rollout side lives in other processes (the
  trainer's ``RemotePipeline``, the rollout side's ``RolloutServer``).
"""
