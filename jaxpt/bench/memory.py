"""Compiled memory of one train step, compile only: no weight is allocated.

The run is the one ``jaxpt.run_spec`` describes for the training loop, on one device: the
task's model from its architecture alone (``Task.build_abstract``), the optimizer with the
loop's wrappers (its non-finite step counters included), the state's shardings, one batch
(``Task.batch_spec``), and the loop's jitted train step (gradient accumulation, the lr
schedule, the state donated). Everything is abstract (``jax.ShapeDtypeStruct``), so the step
of a model far larger than this machine's memory compiles here and XLA reports what it
would need (``compiled_peak_bytes`` and its parts, see ``jaxpt.bench.compiled_memory``).

``--task`` is any task with a batch spec (``jaxpt.run_spec.planned_tasks``). ``--model`` is a
preset or an HF ``config.json`` (or a directory holding one); ``--layers`` overrides the depth
(to show per-layer growth when the full depth is slow to compile). Trailing ``key=value``
overrides set any other config key (e.g. ``train.grad_accum_steps=2``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import jax

from jaxpt.bench import compiled_memory


def add_arguments(parser) -> None:
    parser.add_argument("--task", default="sft",
                        help="a task with a batch spec: sft, rm, dpo, grpo, ppo, ...")
    parser.add_argument("--model", default="bench-tiny", help="preset or HF config.json / dir")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows: sequences, pairs (rm, dpo) or completions (grpo, ppo)")
    parser.add_argument("--seq-len", type=int, default=256, help="sft/rm/dpo row length")
    parser.add_argument("--prompt-len", type=int, default=256, help="grpo/ppo prompt length")
    parser.add_argument("--new-tokens", type=int, default=512, help="grpo/ppo completion length")
    parser.add_argument("--generations", type=int, default=4,
                        help="grpo/ppo completions per prompt")
    parser.add_argument("--beta", type=float, default=None,
                        help="grpo KL weight (> 0: a ref; default: the config's, 0)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--logits-chunk-size", type=int, default=0)
    parser.add_argument("overrides", nargs="*",
                        help="dotted config overrides, e.g. grpo.num_iterations=2")


def hf_config(model: str, layers: int | None = None) -> dict:
    """The HF config dict of a preset, a config.json file or a directory holding one."""
    from jaxpt.config import ConfigError
    from jaxpt.tasks.common import hf_config_dict

    try:
        config = hf_config_dict(model, "--model")
    except ConfigError:
        raise SystemExit(
            f"memory bench: --model {model!r} is neither a preset nor a config"
        ) from None
    if layers is not None:
        config = {**config, "num_hidden_layers": layers}
        config.pop("layer_types", None)
    return config


# The rollout flags as keys of a task's config section, where the section has them.
_ROLLOUT_KEYS = {
    "max_prompt_length": "prompt_len", "max_completion_length": "new_tokens",
    "num_generations": "generations", "samples_per_prompt": "generations", "beta": "beta",
}


def _section_values(args) -> dict:
    from jaxpt.tasks import get_task

    try:
        config_cls = get_task(args.task).config_cls
    except KeyError as error:
        raise SystemExit(f"memory bench: {error.args[0]}") from None
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {key: getattr(args, flag) for key, flag in _ROLLOUT_KEYS.items()
              if key in fields and getattr(args, flag) is not None}
    if "rewards" in fields and not config_cls().rewards:
        values["rewards"] = [{"name": "math"}]  # the train step scores nothing: any will do
    return values


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
        args.task: _section_values(args),
    }
    return load_config(None, getattr(args, "overrides", None) or [], values=values)


def compile_train_step(config, model_config: dict | None = None, devices=None):
    """(compiled train step, trained parameter count) of the run ``config`` describes
    (``jaxpt.run_spec.abstract_run``) on ``devices`` (default: every device, as the run's
    mesh takes them), its model of ``model_config`` (an HF config dict; default:
    ``model.path``'s)."""
    from jaxpt.run_spec import abstract_run, run_mesh
    from jaxpt.sharding import merged_rules, use_rules
    from jaxpt.state import num_params

    mesh = run_mesh(config, devices)
    rules = merged_rules(config.mesh.rules)
    with use_rules(rules):
        run = abstract_run(config, mesh, rules, hf_config=model_config)
    with jax.set_mesh(mesh), use_rules(rules):
        compiled = run.jit_step().lower(run.state, run.batch).compile()
    return compiled, num_params(run.state.params)


def run(args) -> dict:
    from jaxpt.config import ConfigError

    model_config = hf_config(args.model, args.layers)
    with tempfile.TemporaryDirectory() as out:
        try:
            config = run_config(args, out)
            start = time.perf_counter()
            compiled, params = compile_train_step(config, model_config, jax.devices()[:1])
        except ConfigError as error:
            raise SystemExit(f"memory bench: {error}") from None
        compile_s = time.perf_counter() - start
    result = {
        "task": args.task, "model": args.model, "params": params,
        "layers": model_config["num_hidden_layers"], "batch_size": args.batch_size,
        "dtype": args.dtype, "param_dtype": args.param_dtype, "remat": args.remat,
        "logits_chunk_size": args.logits_chunk_size, "compile_s": round(compile_s, 2),
    }
    section = getattr(config, args.task)
    if hasattr(section, "max_completion_length"):
        result.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      generations=args.generations)
        if hasattr(section, "beta"):
            result["beta"] = section.beta
    else:
        result["seq_len"] = args.seq_len
    return {**result, **compiled_memory(compiled)}
