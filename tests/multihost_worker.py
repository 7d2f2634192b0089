"""One process of a multi-host test run:
``python tests/multihost_worker.py DEVICES JOBS [CACHE_DIR]``.

Emulates ``DEVICES`` CPU devices (with a persistent compilation cache in ``CACHE_DIR``, so
jobs of the same shapes compile once), then runs each job of ``JOBS`` (a JSON list of
``[config_path, [key=value, ...]]``) through ``jaxpt.cli.train.main``, the entry point of
``python -m jaxpt.train``, in turn. The process count, id and coordinator come from the
``JAXPT_*`` environment variables the launcher sets (``jaxpt.distributed``). Each job's exit
status is printed as ``job <i> exit <rc>``; the worker's own status is the first nonzero one.
"""

import json
import os
import sys

DIGITS = set("0123456789")


def digit_fraction(prompts, completions, **kwargs):
    """A GRPO reward for tests: the fraction of a completion's characters that are digits."""
    return [sum(c in DIGITS for c in text) / max(len(text), 1) for text in completions]


def main(argv: list[str]) -> int:
    devices, jobs = int(argv[0]), json.loads(argv[1])
    os.environ["XLA_FLAGS"] = (  # after the launcher's compile settings
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import jax

    # Cross-process collectives on CPU (jax 0.10 defaults to gloo; said here so it stays).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if len(argv) > 2:
        jax.config.update("jax_compilation_cache_dir", argv[2])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from jaxpt.cli.train import main as train_main

    status = 0
    for i, (config_path, overrides) in enumerate(jobs):
        rc = train_main(["--config", config_path, *overrides])
        print(f"job {i} exit {rc}", flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
