"""Compiled memory of one train step (SFT or GRPO), compile only: no weight is allocated.

The model, optimizer state and batch are abstract (``nnx.eval_shape`` /
``jax.ShapeDtypeStruct``), so the step of a model far larger than this machine's memory
compiles here and XLA reports what it would need (``compiled_peak_bytes`` and its parts,
see ``jaxpt.bench.compiled_memory``). ``--model`` is a preset or an HF ``config.json`` (or a
directory holding one); ``--layers`` overrides the depth (to show per-layer growth when the
full depth is slow to compile).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.bench import compiled_memory


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=("sft", "grpo"), default="sft")
    parser.add_argument("--model", default="bench-tiny", help="preset or HF config.json / dir")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences (completions)")
    parser.add_argument("--seq-len", type=int, default=256, help="sft row length")
    parser.add_argument("--prompt-len", type=int, default=256, help="grpo prompt length")
    parser.add_argument("--new-tokens", type=int, default=512, help="grpo completion length")
    parser.add_argument("--generations", type=int, default=4, help="grpo completions/prompt")
    parser.add_argument("--beta", type=float, default=0.0, help="grpo KL weight (> 0: a ref)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--logits-chunk-size", type=int, default=0)


def hf_config(model: str, layers: int | None = None) -> dict:
    """The HF config dict of a preset, a config.json file or a directory holding one."""
    from jaxpt.models import preset_config

    config = preset_config(model)
    if config is None:
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.exists(path):
            raise SystemExit(f"memory bench: --model {model!r} is neither a preset nor a config")
        with open(path) as f:
            config = json.load(f)
    if layers is not None:
        config = {**config, "num_hidden_layers": layers}
        config.pop("layer_types", None)
    return config


def run_config(args, output_dir: str):
    """The run config whose train step is compiled (its model path is not read)."""
    from jaxpt.config import load_config

    values = {
        "task": args.task, "output_dir": output_dir,
        "model": {"dtype": args.dtype, "param_dtype": args.param_dtype, "remat": args.remat},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "data": {"train": "arithmetic", "seq_len": args.seq_len},
        "train": {"max_steps": 1000, "batch_size": args.batch_size,
                  "logits_chunk_size": args.logits_chunk_size},
    }
    if args.task == "grpo":
        values["grpo"] = {
            "num_generations": args.generations, "max_prompt_length": args.prompt_len,
            "max_completion_length": args.new_tokens, "beta": args.beta,
        }
    return load_config(None, values=values)


def abstract_batch(task: str, rows: int, length: int) -> dict:
    """ShapeDtypeStructs of a ``task`` (sft or grpo) train batch of ``rows`` x ``length``."""
    ints = ("input_ids", "target_ids", "positions", "segment_ids")
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32) for k in ints}
    if task == "sft":
        batch["loss_mask"] = jax.ShapeDtypeStruct((rows, length), jnp.float32)
        return batch
    for k in ("completion_mask", "old_logprobs"):
        batch[k] = jax.ShapeDtypeStruct((rows, length), jnp.float32)
    batch["advantages"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
    return batch


def compile_train_step(config, model_config: dict, batch: dict):
    """(compiled train step, parameter count) of ``config``'s task on an abstract model of
    ``model_config`` (an HF config dict) on one device."""
    from jaxpt.models.config import config_from_hf
    from jaxpt.models.decoder import CausalLM
    from jaxpt.optim import make_optimizer
    from jaxpt.sharding import make_mesh, merged_rules, use_rules
    from jaxpt.state import TrainState, num_params
    from jaxpt.step import make_train_step
    from jaxpt.tasks import RunContext, get_task
    from jaxpt.tasks.common import keeps_reference

    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    rules = merged_rules(config.mesh.rules)
    m = config.model
    arch = config_from_hf(model_config)
    with jax.set_mesh(mesh), use_rules(rules):
        abstract = nnx.eval_shape(lambda: CausalLM(
            arch, rngs=nnx.Rngs(0), dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
            remat=m.remat, attention_impl=m.attention_impl, scan_layers=m.scan_layers,
        ))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        tx, _ = make_optimizer(config.optim, config.train.max_steps)
        state = TrainState(
            graphdef, params, rest, jax.eval_shape(tx.init, params),
            jax.ShapeDtypeStruct((), jnp.int32),
            jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
            ref_params=params if keeps_reference(config) else None,
        )
        ctx = RunContext(config, mesh, rules, config.output_dir)
        step = make_train_step(get_task(config.task).make_loss(ctx), tx)
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    return compiled, num_params(params)


def run(args) -> dict:
    model_config = hf_config(args.model, args.layers)
    with tempfile.TemporaryDirectory() as out:
        config = run_config(args, out)
        start = time.perf_counter()
        length = args.seq_len if args.task == "sft" else args.prompt_len + args.new_tokens
        batch = abstract_batch(args.task, args.batch_size, length)
        compiled, params = compile_train_step(config, model_config, batch)
        compile_s = time.perf_counter() - start
    result = {
        "task": args.task, "model": args.model, "params": params,
        "layers": model_config["num_hidden_layers"], "batch_size": args.batch_size,
        "dtype": args.dtype, "param_dtype": args.param_dtype, "remat": args.remat,
        "logits_chunk_size": args.logits_chunk_size, "compile_s": round(compile_s, 2),
    }
    if args.task == "sft":
        result["seq_len"] = args.seq_len
    else:
        result.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      generations=args.generations, beta=args.beta)
    return {**result, **compiled_memory(compiled)}
