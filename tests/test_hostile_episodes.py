"""A hostile policy's tool calls, end to end through the episode runner and a GRPO run: every
escape attempt, flood and malformed call ends as a counted error result, the run goes on.

The tiny random model writes no tool calls, so ``HostileEnv`` (a ``ToolEnv``) answers each of
its turns as if the policy had written a scripted hostile one: sandbox escapes through the
``python`` tool (a network socket, a file outside its scratch dir, the trainer's environment
variables and files, a fork bomb and an endless loop stopped at the tool's 1 s limit); a giant
and an invalid UTF-8 output, an unknown tool, arguments of the wrong type and malformed JSON;
then, in half the episodes, 10,000 ``<tool_call>`` blocks in one turn: 8 run, the rest are
error results, and those results (about 530,000 tokens rendered) outgrow the episode's token
budget, which ends it.
"""

import json
import os
import re
import socket
import threading
from typing import ClassVar

import pytest
from tiny import train_rows

from jaxpt.config import load_config
from jaxpt.envs.parsers import parse_hermes
from jaxpt.envs.tool_env import ToolEnv
from jaxpt.loop import run
from jaxpt.rewards.sandbox import run_untrusted

pytestmark = pytest.mark.usefixtures("one_device_runs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_ARITH = os.path.join(ROOT, "configs", "grpo_arith.yaml")
SECRET = "JAXPT_HOSTILE_SECRET"  # an environment variable of the trainer's
FLOOD = 10_000  # <tool_call> blocks in the flooding turn
MAX_CALLS_PER_TURN = 8  # envs.max_tool_calls_per_turn
MAX_OUTPUT_CHARS = 120  # the runner's cap on a result, small: episodes stay short



def _call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def hostile_turns(marker: str, secret_file: str, port: int, trainer_pid: int) -> list[str]:
    """The scripted turns: each program prints ESCAPED only where its attempt got through."""
    escapes = [
        (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
         "print('ESCAPED: connected')"),
        f"open({marker!r}, 'w').write('escaped')\nprint('ESCAPED: wrote')",
        (f"import os\nprint(os.environ.get({SECRET!r}))\n"
         f"print('ESCAPED', open('/proc/{trainer_pid}/environ').read())"),
        f"print('ESCAPED', open({secret_file!r}).read())",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "while True:\n    pass",
    ]
    outputs = [
        _call("python", code="print('A' * 1_000_000)"),
        _call("python", code="import sys\nsys.stdout.buffer.write(b'bad \\xff\\xfe utf-8 \\xc3(')"),
        _call("shell", cmd="rm -rf /"),
        _call("calculator", expression=7),
        '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"\n</tool_call>',
    ]
    flood = "".join(_call("calculator", expression="1+1") for _ in range(FLOOD))
    return ["".join(_call("python", code=code) for code in escapes), "".join(outputs), flood]


class HostileEnv(ToolEnv):
    """A ``ToolEnv`` that runs a scripted hostile turn (``hostile_turns``, by the turn's index)
    in place of each of the policy's turns. Every other episode (by the order of their resets:
    two of each rollout's four) floods on its third turn; the others answer it without calls,
    which ends them. ``steps`` records each step for the test: the turn, its results and the
    runner's count of abandoned calls."""

    steps: ClassVar[list[dict]] = []
    resets = 0
    _lock = threading.Lock()

    def __init__(self, tools=(), *, runner=None, marker: str, secret_file: str, port: int,
                 trainer_pid: int):
        super().__init__(tools, runner=runner)
        self.script = hostile_turns(marker, secret_file, port, trainer_pid)
        self.turn, self.floods = 0, False

    def reset(self, row, seed):
        with HostileEnv._lock:
            self.floods = HostileEnv.resets % 2 == 0
            HostileEnv.resets += 1
        self.turn = 0
        return super().reset(row, seed)

    def step(self, turn):
        script = self.script if self.floods else self.script[:2]
        text = script[self.turn] if self.turn < len(script) else "The answer is 2."
        scripted = parse_hermes(text)
        result = super().step(scripted)
        HostileEnv.steps.append({"turn": self.turn, "messages": result.messages,
                                 "info": result.info,
                                 "abandoned": self.runner.abandoned})
        self.turn += 1
        # The runner counts the parse errors of what the policy wrote; these are the script's.
        result.info.setdefault("metrics", {})["scripted_parse_errors"] = len(scripted.parse_errors)
        return result


def _confined() -> bool:
    """Whether the sandbox keeps a program from the trainer's files (a mount namespace or a
    throwaway uid); without either, reading and writing them is allowed by design."""
    isolation = run_untrusted("", timeout_s=5).isolation
    return "mntns" in isolation or any(p.startswith("uid=") for p in isolation)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny_dir, prompts_file):
    """A 2-step GRPO run over hostile episodes (4 per step), with a socket listening, an
    environment variable set and a file written for the policy to reach; the run's output
    dir, the marker it must not write, the secrets, whether anything connected, and
    ``HostileEnv.steps``."""
    if not _confined():
        pytest.skip("this sandbox cannot hide the trainer's files (no root, no user namespace)")
    tmp = tmp_path_factory.mktemp("hostile")
    output_dir, marker = str(tmp / "run"), str(tmp / "escaped.txt")
    secret_file = tmp / "trainer_secret.txt"
    secrets = {"file": "FILE-SECRET-5d1c", "env": "ENV-SECRET-93ab"}
    secret_file.write_text(secrets["file"])
    overrides = {
        "output_dir": output_dir, "model.path": tiny_dir, "data.train": prompts_file,
        "data.eval": "null", "train.batch_size": 4, "train.log_every": 1, "train.max_steps": 1,
        "grpo.num_generations": 2, "grpo.max_prompt_length": 24,
        "grpo.max_completion_length": 1400, "grpo.rewards": "[]", "grpo.log_completions": 4,
        "logging.progress": "false", "logging.tensorboard": "false", "export.hf": "false",
        "checkpoint.every": 0, "checkpoint.async_save": "false",
    }
    HostileEnv.steps, HostileEnv.resets = [], 0
    with socket.socket() as server, pytest.MonkeyPatch.context() as patch:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        patch.setenv(SECRET, secrets["env"])
        envs = {
            "spec": "test_hostile_episodes:HostileEnv",
            "tools": ["python", "calculator"],
            "kwargs": {"marker": marker, "secret_file": str(secret_file),
                       "port": server.getsockname()[1], "trainer_pid": os.getpid()},
            "max_turns": 4, "max_turn_tokens": 4, "max_parallel": 32, "tool_timeout_s": 1.0,
            "max_tool_output_chars": MAX_OUTPUT_CHARS,
            "max_tool_calls_per_turn": MAX_CALLS_PER_TURN,
        }
        run(load_config(GRPO_ARITH, [f"{k}={v}" for k, v in overrides.items()],
                        values={"envs": envs}))
        try:
            server.accept()
            reached = True
        except BlockingIOError:
            reached = False
    return {"dir": output_dir, "marker": marker, "secrets": secrets, "reached": reached,
            "steps": list(HostileEnv.steps)}


def _episodes(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "completions.jsonl"), "rb") as f:
        lines = f.read().decode("utf-8").splitlines()  # strict: valid UTF-8 throughout
    return [json.loads(line) for line in lines]


# Per episode: turn 0's six escapes all fail; of turn 1's five, the unknown tool, the number
# given as the expression and the malformed call fail; of the flood, 8 run and 9,992 do not.
# Half the episodes flood.
ERRORS = 6 + 3 + (FLOOD - MAX_CALLS_PER_TURN) / 2
CALLS = 6 + 4 + FLOOD / 2  # parsed calls (the malformed one is not a call)


def test_the_run_survives_and_counts_every_error(hostile_run):
    """The step finishes; every episode runs three turns: a flooded one ends by its token
    budget (its 10,000 results do not fit), the others by their environment. The metrics
    count the errors as by hand."""
    rows = train_rows(hostile_run["dir"])
    assert [r["step"] for r in rows] == [1]
    for r in rows:
        assert r["episode/turns"] == 3.0
        assert r["episode/end/tokens"] == 0.5 and r["episode/end/done"] == 0.5
        assert r["episode/end/env_error"] == 0.0  # no step raised
        assert r["completion_length/max"] <= 1400  # within the episode's budget
        assert r["episode/tool_errors"] == ERRORS
        assert r["episode/tool_calls"] == CALLS
        assert r["episode/tool_error_rate"] == pytest.approx(ERRORS / CALLS)
        assert r["episode/tool_calls/python"] == 8.0
        assert r["episode/tool_calls/shell"] == 1.0
        assert r["episode/tool_calls/calculator"] == 1.0 + FLOOD / 2
        assert r["episode/scripted_parse_errors"] == 1.0
        # The random model's own turns (4 characters each) hold no <tool_call> to misparse.
        assert r["episode/parse_errors"] == 0.0
    episodes = _episodes(hostile_run["dir"])
    assert len(episodes) == 4
    for episode in episodes:
        own = [parse_hermes(t["text"]) for t in episode["episode"] if t["role"] == "assistant"]
        assert sum(len(turn.parse_errors) for turn in own) == 0


def test_transcripts_show_the_errors_capped_and_valid(hostile_run):
    """completions.jsonl shows each episode's results as tool messages: the escapes' errors,
    the capped giant output, the invalid UTF-8 replaced, the unknown tool, the bad argument
    and the malformed call; no result is longer than the runner's cap (plus its note)."""
    note = len("\n[... 999999 characters cut ...]\n")
    for logged in _episodes(hostile_run["dir"]):
        turns = logged["episode"]
        assert [t["role"] for t in turns] == (["assistant"] + ["tool"] * 6 + ["assistant"]
                                              + ["tool"] * 5 + ["assistant"])
        tools = [t for t in turns if t["role"] == "tool"]
        assert all(len(t["content"]) <= MAX_OUTPUT_CHARS + note for t in tools)
        escapes, outputs = tools[:6], tools[6:]
        assert all("[the program" in t["content"] for t in escapes), escapes
        assert escapes[0]["content"].endswith(  # the tail of PermissionError's message
            "disabled in the sandbox\n[the program exited with status 1]")
        assert "took longer" not in json.dumps(escapes)  # the sandbox's limit, not the backstop
        for stopped in escapes[4:]:  # the fork bomb and the endless loop, at the 1 s limit
            assert re.search(r"\[the program (ran past 1 s|was killed)", stopped["content"])
        giant, utf8, unknown, bad_argument, malformed = outputs
        assert giant["content"].startswith("A" * 50) and "characters cut" in giant["content"]
        assert utf8["content"] == "bad \ufffd\ufffd utf-8 \ufffd("
        assert unknown["content"].startswith("error: unknown tool 'shell'")
        assert "'expression' of calculator must be string" in bad_argument["content"]
        assert malformed["content"].startswith("error: could not read this tool call")


def test_nothing_escaped_the_sandbox(hostile_run):
    """No connection reached the test's socket, no marker was written, neither the trainer's
    environment variable nor its file shows in any result, and no call outlived the sandbox's
    own limit (the runner abandoned none)."""
    assert not hostile_run["reached"]
    assert not os.path.exists(hostile_run["marker"])
    with open(os.path.join(hostile_run["dir"], "completions.jsonl")) as f:
        logged = f.read()
    assert "ESCAPED" not in logged
    assert all(secret not in logged for secret in hostile_run["secrets"].values())
    escapes = [s for s in hostile_run["steps"] if s["turn"] == 0]
    assert len(escapes) == 4 and all(s["info"]["tool_errors"] == 6 for s in escapes)
    assert all(s["abandoned"] == 0 for s in hostile_run["steps"])


def test_the_flood_runs_only_the_allowed_calls_quickly(hostile_run):
    """Of 10,000 calls in one turn, the first 8 run (1+1 = 2), every other one is an error
    result left unrun."""
    floods = [s for s in hostile_run["steps"] if s["turn"] == 2 and s["messages"]]
    assert len(floods) == 2
    for step in floods:
        contents = [m["content"] for m in step["messages"]]
        assert len(contents) == FLOOD
        assert contents[:MAX_CALLS_PER_TURN] == ["2"] * MAX_CALLS_PER_TURN
        assert all(c.startswith("error: not run") for c in contents[MAX_CALLS_PER_TURN:])
        assert step["info"]["tool_errors"] == FLOOD - MAX_CALLS_PER_TURN


