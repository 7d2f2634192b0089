"""The benchmarks' figures from pure functions: RL step wall time from metrics rows, train
FLOPs per token (full and LoRA) and the named accelerator peaks."""

import json
import types

import pytest

from jaxpt.bench import (
    decoder_flops_per_token,
    lora_adapter_params,
    named_peak_flops,
    step_time_figures,
    step_wall_times,
    train_flops_per_token,
)
from jaxpt.metrics import WALLTIME, MetricsWriter

# d=4, f=8, 2 query heads and 1 KV head of width 2, vocab 10, one layer.
CONFIG = types.SimpleNamespace(hidden_size=4, intermediate_size=8, vocab_size=10,
                               num_heads=2, num_kv_heads=1, head_dim=2, num_layers=1)
SEQ_LEN = 4
# Projections (in x out): q 4x4, k 4x2, v 4x2, o 4x4, gate 4x8, up 4x8, down 8x4 = 144
# weights, plus the LM head 4x10: 184 matmul weights. Attention: 2 * 2 * 4 * 4 / 2 = 32.
MATMUL_WEIGHTS, ATTENTION = 144 + 40, 2 * 2 * 2 * 2 * SEQ_LEN / 2


def _rows():
    """A GRPO-like metrics file: a data row, train rows for steps 1-5 (the write times are
    the step ends) and an eval row between them."""
    ends = [100.0, 130.0, 131.0, 133.0, 134.5]
    rows = [{"step": 0, "data/examples": 8.0, WALLTIME: 99.0}]
    for step, end in enumerate(ends, 1):
        rows.append({"step": step, "loss": 0.1, "time/generate_s": 0.5, "time/reward_s": 0.1,
                     WALLTIME: end})
        if step == 3:
            rows.append({"step": 3, "eval_loss": 0.2, WALLTIME: end + 0.5})
    return rows


def test_rl_step_time_is_the_wall_time_between_step_ends():
    rows = _rows()
    assert step_wall_times(rows, warmup=2) == [1.0, 2.0, 1.5]  # steps 3, 4, 5
    assert step_wall_times(rows, warmup=0) == [30.0, 1.0, 2.0, 1.5]  # step 1 has no start
    figures = step_time_figures(rows, 2, phase_sums=[0.9, 1.2])
    assert figures == {"step_time_s": 1.5, "step_time_mean_s": 1.5,
                       "step_times_s": [1.0, 2.0, 1.5], "phase_sum_s": 1.05}
    # A gap in the logged steps (train.log_every > 1) is not one step's time.
    assert step_wall_times([r for r in rows if r["step"] != 4], warmup=2) == [1.0]
    with pytest.raises(SystemExit, match="raise --steps"):
        step_time_figures(rows, 5, phase_sums=[1.0])


def test_metrics_rows_carry_their_write_time(tmp_path, monkeypatch):
    times = iter([10.0, 12.5])
    monkeypatch.setattr("jaxpt.metrics.time.time", lambda: next(times))
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r[WALLTIME] for r in rows] == [10.0, 12.5]
    assert step_wall_times(rows, warmup=0) == [2.5]


def test_train_flops_full_and_lora():
    assert decoder_flops_per_token(CONFIG, SEQ_LEN) == 2 * MATMUL_WEIGHTS + ATTENTION == 400
    # Full fine-tuning: 6 per weight (forward, activation grad, weight grad), 3x attention.
    assert train_flops_per_token(CONFIG, SEQ_LEN) == 6 * MATMUL_WEIGHTS + 3 * ATTENTION == 1200
    # Rank 2 on every projection: 2 * (sum of in + out) = 2 * (8+6+6+8+12+12+12) = 128.
    adapters = lora_adapter_params(CONFIG, rank=2)
    assert adapters == 128
    # LoRA: frozen weights 4 each (no weight grad), adapters 6 each, attention 3x.
    lora = train_flops_per_token(CONFIG, SEQ_LEN, adapter_params=adapters)
    assert lora == 4 * MATMUL_WEIGHTS + 6 * 128 + 3 * ATTENTION == 1600


def test_moe_flops_count_the_router_and_the_routed_experts_only():
    # CONFIG's layer with 4 experts of width 8, top 2: router 4x4, then 2 x (gate, up,
    # down) = 2 x 96; the dense MLP's 96 (intermediate_size) is not there.
    moe = types.SimpleNamespace(**vars(CONFIG), num_experts=4, experts_per_token=2,
                                moe_intermediate_size=8)
    weights = MATMUL_WEIGHTS - 96 + 16 + 2 * 96
    assert decoder_flops_per_token(moe, SEQ_LEN) == 2 * weights + ATTENTION
    # Adapters on the routed experts' projections, none on the router.
    assert lora_adapter_params(moe, rank=2) == 128 - 2 * 36 + 2 * 2 * 36


@pytest.mark.parametrize(("kind", "dtype", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 495e12),  # TF32 at XLA's default precision
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "float32", 459e12),  # v5p; one bf16 pass at default precision
    ("TPU v6 lite", "bfloat16", 918e12),
])
def test_named_peaks(kind, dtype, peak):
    found, source = named_peak_flops(kind, dtype)
    assert found == peak and source


def test_no_named_peak_for_cpus_or_unknown_devices():
    assert named_peak_flops("cpu", "float32") is None
    assert named_peak_flops("Some Future Accelerator", "bfloat16") is None
