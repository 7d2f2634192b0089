"""OpenEnvEnvironment against real OpenEnv servers: a number-guessing game built with
openenv-core's server classes, served by uvicorn in subprocesses, played with scripted turns.
Checks the messages, rewards and done flags of whole episodes, that each episode keeps its
own state on the server, the configurable action and observation mappings, and that a
failing step (a server error, a server that dies mid-episode) ends the episode with a
counted error instead of raising."""

import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from tiny import free_port

from jaxpt.envs import AssistantTurn, OpenEnvEnvironment
from jaxpt.envs.openenv import import_openenv_client

pytestmark = pytest.mark.usefixtures("one_device_runs")

pytest.importorskip("openenv")

# The game: guess the digit seed % 10 in at most 3 tries; the observation's `prompt` says
# higher or lower. A session per episode keeps the target between steps.
GUESS_SERVER = """
import sys
sys.modules["gradio"] = None  # openenv-core's optional web UI: unused here, slow to import
import uvicorn
from openenv.core.env_server import Action, Environment, Observation, State, create_fastapi_app

class Guess(Action):
    message: str

class Hint(Observation):
    prompt: str = ""
    guesses_left: int = 3

class GuessingGame(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state, self.target, self.left = State(), 0, 3

    def reset(self, seed=None, episode_id=None, **kwargs):
        self._state, self.target, self.left = State(episode_id=episode_id), (seed or 0) % 10, 3
        return Hint(prompt="Guess a digit from 0 to 9.", guesses_left=3)

    def step(self, action, timeout_s=None, **kwargs):
        self._state.step_count += 1
        self.left -= 1
        guess = action.message.strip()
        if guess == str(self.target):
            return Hint(prompt="Right!", guesses_left=self.left, done=True, reward=1.0)
        hint = "higher" if guess.isdigit() and int(guess) < self.target else "lower"
        return Hint(prompt=f"Wrong, go {hint}.", guesses_left=self.left,
                    done=self.left == 0, reward=0.0)

    @property
    def state(self):
        return self._state

app = create_fastapi_app(GuessingGame, Guess, Hint, max_concurrent_envs=8)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def start_server() -> tuple[str, subprocess.Popen]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", GUESS_SERVER, str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return f"http://127.0.0.1:{port}", process


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the OpenEnv test server exited: {process.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the OpenEnv test server at {url} did not come up")


@pytest.fixture(scope="module")
def servers():
    """Game servers started together: one the scripted tests share, one a test kills, one
    for the training run alone (every session it holds is the run's)."""
    started = [start_server(), start_server(), start_server()]
    try:
        import_openenv_client()  # the adapter's own import, while the servers start
        for url, process in started:
            wait_healthy(url, process)
        yield {"shared": started[0][0], "doomed": started[1], "training": started[2][0]}
    finally:
        for _, process in started:
            process.kill()
            process.wait()


def turn(text: str) -> AssistantTurn:
    return AssistantTurn(text=text, content=text)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_an_episode_of_several_steps(servers):
    env = OpenEnvEnvironment(servers["shared"], timeout_s=10)
    try:
        first = env.reset({"prompt": "You play a game."}, seed=np.int64(17))
        # The row's prompt and the first observation join into one user turn.
        assert first == user("You play a game.\n\nGuess a digit from 0 to 9.")
        wrong = env.step(turn(" 3 "))
        assert (wrong.messages, wrong.reward, wrong.done) == (user("Wrong, go higher."), 0.0, False)
        right = env.step(turn("7"))
        assert (right.messages, right.reward, right.done) == (user("Right!"), 1.0, True)
        assert "env_errors" not in right.info.get("metrics", {})
        assert env.client is None  # the finished episode's session is closed
    finally:
        env.close()


def test_episodes_keep_their_own_state_and_run_out_of_guesses(servers):
    games = [OpenEnvEnvironment(servers["shared"]) for _ in range(2)]
    try:
        assert games[0].reset({}, seed=2) == user("Guess a digit from 0 to 9.")  # no prompt
        games[1].reset({}, seed=8)
        # Interleaved: each server session keeps its own target and guess count.
        steps = [games[i].step(turn("5")) for i in (0, 1, 0, 1)]
        assert [s.messages[0]["content"] for s in steps] == [
            "Wrong, go lower.", "Wrong, go higher.", "Wrong, go lower.", "Wrong, go higher."]
        last = games[0].step(turn("9"))
        assert (last.reward, last.done) == (0.0, True)  # the third wrong guess ends it
        assert games[1].step(turn("8")).reward == 1.0
    finally:
        for game in games:
            game.close()


def guess_in_answer_tag(turn: AssistantTurn) -> dict:
    """An action builder by import path: the guess inside <answer> tags."""
    found = re.search(r"<answer>(.*?)</answer>", turn.text)
    return {"message": found.group(1) if found else ""}


def test_action_and_observation_mappings(servers):
    def as_tool_result(observation: dict, first: bool) -> list[dict]:
        role = "user" if first else "tool"
        text = f"{observation['prompt']} ({observation['guesses_left']} left)"
        return [{"role": role, "content": text}]

    env = OpenEnvEnvironment(servers["shared"], action="test_openenv:guess_in_answer_tag",
                             observation_to_messages=as_tool_result)
    try:
        assert env.reset({}, seed=4) == user("Guess a digit from 0 to 9. (3 left)")
        step = env.step(turn("I think <answer>4</answer>"))
        assert step.messages == [{"role": "tool", "content": "Right! (2 left)"}]
        assert step.reward == 1.0
    finally:
        env.close()
    # A named field: the observation's number, as text.
    env = OpenEnvEnvironment(servers["shared"], observation_field="guesses_left")
    try:
        assert env.reset({}, seed=4) == user("3")
    finally:
        env.close()


def test_a_server_error_ends_the_episode_with_a_counted_error(servers):
    env = OpenEnvEnvironment(servers["shared"], action="guess")  # the server expects `message`
    try:
        env.reset({}, seed=1)
        failed = env.step(turn("1"))
        assert failed.done and failed.reward == 0.0 and failed.messages == []
        assert failed.info["metrics"] == {"env_errors": 1}
        assert servers["shared"] in failed.info["error"]
    finally:
        env.close()


def test_a_server_that_dies_mid_episode_is_a_counted_error(servers):
    url, process = servers["doomed"]
    env = OpenEnvEnvironment(url, timeout_s=5)
    try:
        env.reset({}, seed=6)
        assert env.step(turn("1")).messages == user("Wrong, go higher.")
        process.kill()
        process.wait()
        failed = env.step(turn("6"))
        assert failed.done and failed.reward == 0.0
        assert failed.info["metrics"] == {"env_errors": 1}
        assert env.step(turn("6")).info["metrics"] == {"env_errors": 1}  # and stays ended
    finally:
        env.close()


def test_an_unreachable_server_fails_at_reset_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    env = OpenEnvEnvironment(url, connect_timeout_s=2)
    with pytest.raises(ConnectionError, match=re.escape(url)):
        env.reset({}, seed=0)
    env.close()


def test_built_from_config_kwargs_and_import_errors_name_the_extra(monkeypatch):
    env = OpenEnvEnvironment(base_url="http://localhost:8000/", action="text", timeout_s=5)
    assert env.base_url == "http://localhost:8000"
    assert env.make_action(turn("hi")) == {"text": "hi"}
    with pytest.raises(ValueError, match="cannot be imported"):
        OpenEnvEnvironment("http://x", action="no_such_module_xyz:fn")
    monkeypatch.setitem(sys.modules, "openenv.core.generic_client", None)  # not installed
    with pytest.raises(ImportError, match=r"jaxpt\[openenv\]"):
        OpenEnvEnvironment("http://x")



def test_grpo_trains_against_the_server_through_the_adapter(servers, tmp_path, tiny_dir,
                                                            prompts_file):
    """Three GRPO steps whose episodes are games on the OpenEnv server (``envs.spec:
    openenv``): every episode ends by the game's own rule (right, or out of guesses), the
    server's rewards are the episodes' rewards, and the transcripts hold its hints."""
    import json
    import os

    from tiny import train_rows

    from jaxpt.config import load_config
    from jaxpt.loop import run

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    url = servers["training"]
    overrides = {
        "output_dir": str(tmp_path), "model.path": tiny_dir, "data.train": prompts_file,
        "data.eval": "null", "train.batch_size": 4, "train.max_steps": 3,
        "train.log_every": 1, "grpo.num_generations": 2, "grpo.max_prompt_length": 48,
        "grpo.max_completion_length": 128, "grpo.rewards": "[]", "grpo.log_completions": 1,
        "optim.lr": 3e-3, "logging.progress": "false", "logging.tensorboard": "false",
        "export.hf": "false", "checkpoint.every": 0, "envs.spec": "openenv",
        "envs.kwargs": f"{{base_url: '{url}', timeout_s: 60, connect_timeout_s: 60}}",
        "envs.max_turn_tokens": 3, "envs.max_turns": 4,
    }
    config = load_config(os.path.join(root, "configs", "grpo_arith.yaml"),
                         [f"{k}={v}" for k, v in overrides.items()])
    run(config)
    rows = train_rows(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["episode/end/done"] == 1.0  # the game, not a limit, ended every episode
        assert 1.0 <= r["episode/turns"] <= 3.0  # at most three guesses
        assert r["reward"] == r["episode/reward_env"]  # the server's rewards alone
    assert all(np.isfinite(r["loss"]) for r in rows)
    with open(os.path.join(str(tmp_path), "completions.jsonl")) as f:
        episode = json.loads(f.readline())["episode"]
    assert episode[0]["role"] == "assistant" and episode[1]["role"] == "user"
    assert re.match(r"(Wrong, go (higher|lower)\.|Right!)", episode[1]["content"])
