"""Test setup: emulate 8 CPU devices before jax is imported, share compiled programs between
tests and processes, and share small fixtures."""

import ast
import collections
import functools
import gc
import importlib.metadata
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiled programs persist here, shared by the xdist workers and by the `python -m jaxpt...`
# subprocesses tests start (they inherit these variables): the suite compiles the same tiny
# programs again and again (a run, its stopped twin, the resumed one). The key holds the
# program, the devices it runs on and the jax version, so 1- and 8-device programs never mix.
COMPILATION_CACHE = os.path.join(ROOT, ".pytest_cache", "jax-compilation-cache")
COMPILATION_CACHE_MAX_BYTES = 2 << 30  # wiped at the next session start beyond this

# The suite's programs are tiny: compiling them costs far more than running them. Compiled
# for tests: no LLVM optimisation passes, one LLVM module per program, and (on the jaxlib
# this was measured on; flags a jaxlib does not know abort it) XLA's older loop emitters
# for fusions, which compile faster than its MLIR ones. XLA's own passes still run, and
# every tolerance holds (the SmolLM2 parity test's is set for it). Subprocesses get them too
# (``tiny.one_device_env``).
TEST_XLA_FLAGS = ["--xla_backend_optimization_level=0", "--xla_cpu_parallel_codegen_split_count=1"]
if importlib.metadata.version("jaxlib").startswith("0.10."):
    TEST_XLA_FLAGS.append("--xla_cpu_use_fusion_emitters=false")
xla_flags = os.environ.get("XLA_FLAGS", "")
for flag in TEST_XLA_FLAGS:
    if flag.split("=")[0] not in xla_flags:  # a flag set by hand wins
        xla_flags += " " + flag
os.environ["XLA_FLAGS"] = (xla_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", COMPILATION_CACHE)
# Every program: most of the suite's are tiny, and they repeat across tests and processes.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    """Once per session (not in xdist workers): start afresh when the compilation cache
    has outgrown its bound (entries of old code and jax versions are never read again)."""
    if hasattr(config, "workerinput"):
        return
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    if os.path.isdir(cache) and _tree_bytes(cache) > COMPILATION_CACHE_MAX_BYTES:
        shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The long tests first, so that no long one starts last while the other xdist worker
    idles: modules holding slow (end-to-end) tests, then modules that share a module-scoped
    fixture (a run several tests read: one unit of work, see ``SharedFixtureScheduling``),
    the larger first, then the rest; a module's tests stay together."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    shared_sizes = collections.Counter(
        item.path for item in items if _defines_module_fixture(str(item.path)))

    def rank(item):
        size = shared_sizes[item.path]  # 0: each test a unit of its own
        return (0 if item.path in slow_modules else 1 if size else 2), -size

    items.sort(key=rank)  # stable: collection order within a rank


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown without xdist
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadgroup`` (``make test``), ``SharedFixtureScheduling`` below."""
    if config.getvalue("dist") == "loadgroup":
        from xdist.scheduler import LoadGroupScheduling

        # Units in collection order (the order above). xdist's default, the units with the
        # most tests first, overrode it: the multi-host run (8 tests) started after modules
        # of many quick tests, and one-test units (the quickstart, the accelerator check)
        # only after every module.
        config.option.loadscopereorder = False

        class SharedFixtureScheduling(LoadGroupScheduling):
            """One test at a time to whichever worker is free, in collection order, but a
            module that defines a module-scoped fixture (a run several tests read) as one
            unit, so one worker makes it once. (``xdist_group`` marks alone no longer group
            under pytest 9.2: xdist renames the test ids to do it, which pytest ignores.)"""

            def _split_scope(self, nodeid):
                scope = super()._split_scope(nodeid)
                if scope != nodeid:
                    return scope  # an xdist_group mark, where xdist could still read it
                path = nodeid.split("::", 1)[0]
                shared = _defines_module_fixture(os.path.join(str(config.rootpath), path))
                return path if shared else nodeid

        return SharedFixtureScheduling(config, log)
    return None


@functools.cache
def _defines_module_fixture(path: str) -> bool:
    """Whether the test module at ``path`` defines a ``@pytest.fixture(scope="module")``."""
    with open(path) as f:
        tree = ast.parse(f.read())
    return any(
        isinstance(call, ast.Call) and any(
            k.arg == "scope" and isinstance(k.value, ast.Constant) and k.value.value == "module"
            for k in call.keywords)
        for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
        for call in node.decorator_list
    )


def pytest_collection_finish(session):
    """Hide what importing the tests built (jax, torch, transformers: ~500k objects) from
    the garbage collector: every run's full collection before it compiles
    (``jaxpt.host_memory.release_freed_memory``) then walks only what the tests allocate,
    not 0.5 s of imported modules each time."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Once a module's last test and its module fixtures are torn down, hide what survives
    (JAX's tracing and compile caches, mostly) from the collector too: those full
    collections grew to ~0.3 s each by the end of a worker's share, a run's setup making
    one."""
    yield
    if nextitem is None or nextitem.module is not item.module:
        gc.collect()
        gc.freeze()


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)


@pytest.fixture(scope="module")
def one_device_runs():
    """In-process training runs (``jaxpt.loop.run``, ``setup`` without a mesh, the train
    CLI's ``main``) on the first device, as ``python -m jaxpt.train`` runs in the CLI tests'
    subprocesses (``tiny.one_device_env``): the tiny model gains nothing from 8 emulated devices on
    a few cores, and tests about sharding pass their own mesh (``mesh8``). A config that
    names a mesh of several devices keeps it. Module-scoped, so that a module's shared runs
    (module fixtures that ask for it) get it too: ``pytestmark =
    pytest.mark.usefixtures("one_device_runs")``."""
    from jaxpt import loop
    from jaxpt.run_spec import run_mesh

    def first_device_mesh(config, devices=None):
        sizes = tuple(config.mesh.axis_sizes().values())
        if devices is None and all(size in (1, -1) for size in sizes):
            devices = jax.devices()[:1]
        return run_mesh(config, devices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "run_mesh", first_device_mesh)
        yield


@pytest.fixture(scope="session")
def mesh8():
    """A (data=2, fsdp=2, tensor=2) mesh over the 8 emulated CPU devices."""
    from jaxpt.sharding import make_mesh

    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="session")
def mesh1():
    """A single-device mesh with the same axis names."""
    from jaxpt.sharding import make_mesh

    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random HF checkpoint (Llama, 2 layers) with the shipped tokenizer."""
    from tiny import make_tiny_dir

    return make_tiny_dir(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """32 RL prompts "Say i" with answer i (.jsonl), for the toy-reward RL runs."""
    import json

    path = tmp_path_factory.mktemp("rl_prompts") / "prompts.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n" for i in range(32))
    return str(path)
