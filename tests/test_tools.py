"""Tools and tool-call parsing: real chat templates round-trip their calls, the runner
survives whatever a policy writes, the sandboxed python tool contains hostile programs, and
the calculator is exact and bounded."""

import json
import os
import socket
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from jaxpt.envs import (
    ToolCall,
    ToolError,
    ToolResult,
    ToolRunner,
    as_tool,
    calculator,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
    parser_for,
    python_tool,
    resolve_tools,
    tool_messages,
)

TEMPLATES = Path(__file__).parent / "templates"
IS_ROOT = os.geteuid() == 0
SLACK = 10  # timing bounds catch a limit that is not enforced, on a busy 2-core machine


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city.

    Args:
        city: The city to look up.
        unit: The temperature unit. (choices: ["celsius", "fahrenheit"])
    """
    return f"{city}: 21 degrees {unit}"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from jaxpt.data.tokenizer_builder import ASSET_DIR

    return AutoTokenizer.from_pretrained(str(ASSET_DIR), local_files_only=True)


# --- real chat templates: render a call, parse it back -------------------------------------


class TemplateCase(NamedTuple):
    parser: Callable  # the one parser_for(template) must pick
    special_tokens: dict  # what the model's real tokenizer gives the template
    shown: Callable[[dict], str]  # how a tool schema appears in the prompt
    several_calls: bool  # Llama 3.1: "This model only supports single tool-calls at once!"
    renders_content: bool  # beside the calls
    ids: bool  # Mistral: 9-character call ids, required by the template


TEMPLATE_CASES = {
    "qwen2.5": TemplateCase(parse_hermes, {}, json.dumps, True, True, False),
    "llama3.1": TemplateCase(
        parse_llama3_json,
        {"bos_token": "<|begin_of_text|>"},
        lambda schema: json.dumps(schema, indent=4),
        several_calls=False,
        renders_content=False,
        ids=False,
    ),
    "mistral": TemplateCase(
        parse_mistral,
        {"bos_token": "<s>", "eos_token": "</s>"},
        lambda schema: json.dumps(schema["function"]["parameters"]),
        several_calls=True,
        renders_content=False,
        ids=True,
    ),
}


@pytest.mark.parametrize("template_name", sorted(TEMPLATE_CASES))
def test_real_template_round_trip(tokenizer, template_name):
    case = TEMPLATE_CASES[template_name]
    template = (TEMPLATES / f"{template_name}.jinja").read_text()
    assert parser_for(template) is case.parser  # auto picks by what the template renders

    runner = ToolRunner([get_weather, "calculator"])
    arguments = [{"city": "Paris"}, {"city": "Oslo", "unit": "fahrenheit"}][
        : 2 if case.several_calls else 1
    ]
    calls = [
        {
            "type": "function",
            "id": f"call{index:05d}",
            "function": {"name": "get_weather", "arguments": args},
        }
        for index, args in enumerate(arguments)
    ]
    content = "Let me look that up." if case.renders_content else ""
    messages = [{"role": "user", "content": "What is the weather in Paris and Oslo?"}]

    def render(conversation, **kwargs):
        return tokenizer.apply_chat_template(
            conversation, tools=runner.schemas, chat_template=template, tokenize=False,
            **case.special_tokens, **kwargs,
        )  # fmt: skip

    prompt = render(messages, add_generation_prompt=True)
    for schema in runner.schemas:  # as_tool's schemas reach the model
        assert case.shown(schema) in prompt
    rendered = render([*messages, {"role": "assistant", "content": content, "tool_calls": calls}])
    assert rendered.startswith(prompt)
    assistant_text = rendered[len(prompt) :]
    # What the policy's tokens decode to, special tokens kept.
    ids = tokenizer.encode(assistant_text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == assistant_text

    turn = case.parser(assistant_text)
    assert turn.parse_errors == []
    assert [(call.name, call.arguments) for call in turn.tool_calls] == [
        ("get_weather", args) for args in arguments
    ]
    assert turn.content == content
    assert [call.id for call in turn.tool_calls] == [
        call["id"] if case.ids else None for call in calls
    ]

    # The results go back through the same template as the next messages.
    results = runner.run(turn.tool_calls)
    assert [result.error for result in results] == [None] * len(arguments)
    follow_up = render(
        [*messages, {"role": "assistant", "content": content, "tool_calls": calls},
         *tool_messages(turn.tool_calls, results)]
    )  # fmt: skip
    for result in results:
        assert result.content in follow_up


def test_mistral_v11_calls_with_and_without_ids():
    text = (
        'Checking both.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Oslo"}</s>'
    )
    turn = parse_mistral(text)
    assert turn.content == "Checking both." and turn.parse_errors == []
    assert turn.tool_calls == [
        ToolCall("get_weather", {"city": "Paris"}),
        ToolCall("get_weather", {"city": "Oslo"}, "a1b2c3d4e"),
    ]


def test_parser_choice_by_name_and_fallback():
    assert parser_for(None) is parse_hermes  # no template: the common format
    assert parser_for("{{ messages }}") is parse_hermes
    llama32_instruction = '{"name": function name, "parameters": dictionary of argument name'
    assert parser_for(llama32_instruction) is parse_llama3_json  # Llama 3.2: no python tag
    assert parser_for((TEMPLATES / "qwen2.5.jinja").read_text(), "mistral") is parse_mistral
    with pytest.raises(ValueError, match=r"'hermes', 'llama3_json', 'mistral'"):
        parser_for(None, "qwen")


def test_llama3_forms():
    tagged = parse_llama3_json(
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
        "<|eom_id|>"
    )
    assert [call.name for call in tagged.tool_calls] == ["a", "b"] and tagged.content == ""
    answer = parse_llama3_json('{"result": 3} is the JSON you asked for.<|eot_id|>')
    assert answer.tool_calls == [] and answer.parse_errors == []  # an answer, not a call
    assert answer.content == '{"result": 3} is the JSON you asked for.'
    broken = parse_llama3_json('Calling.<|python_tag|>{"name": "a", "parameters": {"x": ')
    assert broken.tool_calls == [] and len(broken.parse_errors) == 1
    assert broken.content == "Calling."


def test_hermes_open_last_block():
    # "</tool_call>" used as a stop string: the call is whole.
    stopped = parse_hermes('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n')
    assert stopped.tool_calls == [ToolCall("a", {"x": 1})] and stopped.parse_errors == []
    cut = parse_hermes('Sure.\n<tool_call>\n{"name": "a", "argu')  # out of tokens
    assert cut.tool_calls == [] and "unclosed" in cut.parse_errors[0]
    assert cut.content == "Sure."


# --- what a policy may write: malformed calls, floods ----------------------------------------


@pytest.mark.parametrize(
    "parser, text",
    [
        (parse_hermes, '<tool_call>\n{"name": "calculator", "arguments": {"x": }\n</tool_call>'),
        (parse_hermes, '<tool_call>["calculator", {"expression": "1"}]</tool_call>'),
        (parse_hermes, '<tool_call>{"name": "calculator", "arguments": "not json"}</tool_call>'),
        (parse_hermes, '<tool_call>{"name": 7, "arguments": {}}</tool_call>'),
        (parse_hermes, "<tool_call>" + "[" * 100_000 + "</tool_call>"),  # deeper than the stack
        (parse_llama3_json, '<|python_tag|>{"name": "calculator", "parameters": [1, 2]}'),
        (parse_mistral, '[TOOL_CALLS][{"name": "calculator", "arguments": {"expression": "1"'),
        (parse_mistral, "[TOOL_CALLS]calculator{no args marker}"),
    ],
)  # fmt: skip
def test_malformed_call_becomes_an_error_result(parser, text):
    turn = parser(text)
    assert turn.tool_calls == [] and len(turn.parse_errors) == 1
    results = ToolRunner(["calculator"]).run(turn.tool_calls, turn.parse_errors)
    assert [result.error for result in results] == ["malformed_call"]
    assert results[0].content.startswith("error: could not read this tool call")


def test_ten_thousand_calls_in_one_turn():
    text = "Many.\n" + "".join(
        f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{i} * 2"}}}}\n'
        "</tool_call>\n"
        for i in range(10_000)
    )
    started = time.monotonic()
    turn = parse_hermes(text)
    results = ToolRunner(["calculator"], max_calls_per_turn=8).run(turn.tool_calls)
    assert time.monotonic() - started < 5.0
    assert len(turn.tool_calls) == 10_000 and turn.content == "Many."
    assert [result.content for result in results[:8]] == [str(i * 2) for i in range(8)]
    assert all(result.error == "too_many_calls" for result in results[8:])
    assert len(results) == 10_000


# --- the runner: nothing a tool does escapes it --------------------------------------------


def test_runner_failures_are_results():
    release = threading.Event()

    def shout(text: str) -> str:
        """Raise with the text.

        Args:
            text: What to say.
        """
        raise ValueError(text)

    def leave(code: int) -> str:
        """Exit the interpreter (from a worker thread).

        Args:
            code: The exit code.
        """
        raise SystemExit(code)

    def hang(seconds: float) -> str:
        """Wait.

        Args:
            seconds: How long.
        """
        release.wait(seconds)
        return "late"

    runner = ToolRunner([get_weather, shout, leave, hang], timeout_s=0.3, max_calls_per_turn=9)
    calls = [
        ToolCall("shout", {"text": "boom"}),
        ToolCall("leave", {"code": 3}),
        ToolCall("hang", {"seconds": 60}),
        ToolCall("rm_rf", {"path": "/"}),
        ToolCall("get_weather", {}),  # missing argument
        ToolCall("get_weather", {"city": "Paris", "country": "FR"}),  # unexpected argument
        ToolCall("get_weather", {"city": ["Paris"]}),  # wrong JSON type
        ToolCall("get_weather", ["Paris"]),  # not an object
        ToolCall("get_weather", {"city": "Oslo"}, id="x1"),
    ]
    started = time.monotonic()
    try:
        results = runner.run(calls)
    finally:
        release.set()  # let the abandoned thread end with the test
    assert time.monotonic() - started < 0.3 * SLACK
    assert [result.error for result in results] == [
        "raised", "raised", "timeout", "unknown_tool",
        "bad_arguments", "bad_arguments", "bad_arguments", "bad_arguments", None,
    ]  # fmt: skip
    assert results[0].content == "error: ValueError: boom"
    assert "SystemExit" in results[1].content
    assert "get_weather" in results[3].content  # the policy learns what exists
    assert "country" in results[5].content and "string" in results[6].content
    assert results[8] == ToolResult("get_weather", "Oslo: 21 degrees celsius")
    assert runner.abandoned == 1
    messages = tool_messages(calls, results)
    assert messages[8] == {
        "role": "tool", "name": "get_weather", "content": "Oslo: 21 degrees celsius",
        "tool_call_id": "x1",
    }  # fmt: skip
    assert "tool_call_id" not in messages[0]


def test_odd_outputs_are_text_and_capped():
    class Hostile:
        def __str__(self):
            raise RuntimeError("no")

        __repr__ = __str__

    loop = []
    loop.append(loop)
    values = {
        "giant": "x" * 10_000_000 + "END",
        "bytes": b"ok \xff\xfe bytes",
        "surrogate": "ok \udcff",
        "mapping": {"a": [1, 2.5, None]},
        "loop": loop,
        "hostile": Hostile(),
    }

    def emit(kind: str):
        """Return an odd value.

        Args:
            kind: Which one.
        """
        return values[kind]

    runner = ToolRunner([emit], max_output_chars=1000)
    results = runner.run([ToolCall("emit", {"kind": kind}) for kind in values])
    by_kind = dict(zip(values, results, strict=True))
    assert all(result.error is None for result in results)
    giant = by_kind["giant"]
    assert giant.truncated and len(giant.content) < 1100 and giant.content.endswith("END")
    assert "characters cut" in giant.content
    assert by_kind["bytes"].content == "ok \ufffd\ufffd bytes"
    assert by_kind["surrogate"].content.encode("utf-8")  # encodable
    assert json.loads(by_kind["mapping"].content) == {"a": [1, 2.5, None]}
    assert by_kind["loop"].content == "[[...]]"
    assert by_kind["hostile"].content == "<unprintable Hostile>"


def test_calls_run_in_parallel_and_keep_their_order():
    def nap(seconds: float, label: str) -> str:
        """Sleep, then answer.

        Args:
            seconds: How long to sleep.
            label: What to answer.
        """
        time.sleep(seconds)
        return label

    runner = ToolRunner([nap], max_workers=4)
    started = time.monotonic()
    results = runner.run(
        [ToolCall("nap", {"seconds": 0.5 - 0.1 * i, "label": str(i)}) for i in range(4)]
    )  # the first call ends last
    assert [result.content for result in results] == ["0", "1", "2", "3"]
    assert time.monotonic() - started < 1.2  # not 0.5 + 0.4 + 0.3 + 0.2


def test_wedged_workers_time_out_the_next_calls():
    release = threading.Event()

    def hang() -> str:
        """Wait until released."""
        release.wait(60)
        return "done"

    runner = ToolRunner([hang, get_weather], timeout_s=0.2, max_workers=1)
    try:
        assert runner.run([ToolCall("hang", {})])[0].error == "timeout"
        blocked = runner.run([ToolCall("get_weather", {"city": "Oslo"})])[0]
        assert blocked.error == "timeout" and "no worker free" in blocked.content
    finally:
        release.set()
    for thread in threading.enumerate():
        if thread.name == "tool-hang":
            thread.join()  # its slot comes back when it ends
    assert runner.run([ToolCall("get_weather", {"city": "Oslo"})])[0].error is None


# --- building tools --------------------------------------------------------------------------


def test_as_tool_from_functions_names_and_paths():
    weather = as_tool(get_weather)
    function = weather.schema["function"]
    assert weather.name == function["name"] == "get_weather"
    assert function["description"] == "Get the current weather in a city."
    assert function["parameters"]["required"] == ["city"]
    assert function["parameters"]["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert [tool.name for tool in resolve_tools(["calculator", "python"])] == [
        "calculator", "python",
    ]  # fmt: skip
    assert as_tool("jaxpt.envs.tools:calculator").fn is calculator
    assert as_tool(get_weather, timeout_s=3.0).timeout_s == 3.0


def untyped(city):
    """Look up a city.

    Args:
        city: The city.
    """


def undocumented(city: str) -> str:
    return city


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("web_search", "'web_search'"),
        ("jaxpt.envs.tools:no_such_tool", "'jaxpt.envs.tools:no_such_tool'"),
        ("no_such_package.mod:fn", "'no_such_package.mod:fn'"),
        (untyped, "'untyped'"),
        (undocumented, "'undocumented'"),
    ],
)
def test_as_tool_errors_name_the_spec(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        as_tool(spec)


def test_tool_names_are_unique():
    with pytest.raises(ValueError, match="calculator"):
        resolve_tools(["calculator", calculator])


# --- the python tool: the sandbox holds -----------------------------------------------------


def test_python_tool_runs_code_and_blocks_escapes(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        outside = tmp_path / "escaped.txt"
        program = textwrap.dedent(
            f"""
            import socket, sys
            print(6 * 7)
            try:
                socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=2)
                print("CONNECTED")
            except OSError:
                print("NO NETWORK")
            try:
                open({str(outside)!r}, "w").write("escaped")
                print("WROTE OUTSIDE")
            except OSError:
                print("NO WRITE")
            sys.stdout.flush()
            sys.stdout.buffer.write(b"bad utf-8: \\xff\\n")
            """
        )
        result = ToolRunner([python_tool(timeout_s=5.0)]).run(
            [ToolCall("python", {"code": program})]
        )[0]
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody reached the trainer's socket
    assert result.error is None, result.content
    lines = result.content.splitlines()
    assert lines[:2] == ["42", "NO NETWORK"]
    assert lines[3] == "bad utf-8: \ufffd"
    if IS_ROOT:  # a throwaway uid; without root, a mount namespace may or may not hide tmp
        assert lines[2] == "NO WRITE" and not outside.exists()


def test_python_tool_fork_bomb_ends_at_its_limit():
    bomb = textwrap.dedent(
        """
        import os
        print("started", flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    )
    runner = ToolRunner([python_tool(timeout_s=1.0)])
    started = time.monotonic()
    result = runner.run([ToolCall("python", {"code": bomb})])[0]
    assert time.monotonic() - started < 1.0 * SLACK
    assert result.error in ("timeout", "raised"), result
    assert result.content.startswith("started")
    assert "[the program" in result.content  # why it ended, for the policy
    assert runner.abandoned == 0  # the sandbox ended it, not the runner's backstop


# --- the calculator -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("123 * 239 + 2", "29399"),
        ("(17 + 3) * 1474.75", "29495"),
        ("2 ** 64", "18446744073709551616"),
        ("12345678901234567890 * 98765432109876543210", "1219326311370217952237463801111263526900"),
        ("-7 // 2", "-4"),  # floor division rounds down
        ("-7 % 3", "2"),
        ("7 / 2", "3.5"),
        ("0.1 + 0.2", "0.3"),  # no binary noise
        ("2 ** -2", "0.25"),
        ("-(-(3))", "3"),
        ("1 / 3", "0.333333333333333"),
        ("3 ** 40", "12157665459056928801"),
    ],
)
def test_calculator_values(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize(
    "expression, fragment",
    [
        ("9 ** 9 ** 9", "too large"),
        ("2 ** 100000", "too large"),
        ("10 ** 2000 * 10 ** 2000", "too large"),
        ("1e308 * 10", "finite"),
        ("(-8) ** 0.5", "real"),
        ("1 / 0", "division by zero"),
        ("1 + " * 60 + "1", "longer than"),
        ("x + 1", "Name"),
        ("(1).real", "Attribute"),
        ("abs(-1)", "Call"),
        ("__import__('os').system('true')", "Call"),
        ("'a' * 3", "str"),
        ("True + 1", "bool"),
        ("1 < 2", "Compare"),
        ("[1][0]", "Subscript"),
        ("(y := 2)", "NamedExpr"),
        ("1; 2", "not an arithmetic expression"),
        ("1 +", "not an arithmetic expression"),
        ("1\x00", "not an arithmetic expression"),
    ],
)
def test_calculator_refuses(expression, fragment):
    started = time.monotonic()
    with pytest.raises(ToolError, match=fragment):
        calculator(expression)
    assert time.monotonic() - started < 1.0


def test_calculator_errors_reach_the_policy():
    result = ToolRunner(["calculator"]).run([ToolCall("calculator", {"expression": "1/0"})])[0]
    assert result == ToolResult("calculator", "error: division by zero", "raised")
