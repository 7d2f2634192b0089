"""``jaxpt.serve``: the OpenAI-compatible server, driven by the official ``openai`` client
and by raw HTTP, on the tiny model. A served greedy reply is ``generate``'s reply."""

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from tiny import free_port

openai = pytest.importorskip("openai", reason="pip install openai (the test extra)")
uvicorn = pytest.importorskip("uvicorn", reason="pip install 'jaxpt[serve]'")

from jaxpt.cli.serve import build_parser, load_backend
from jaxpt.data import encode_prompt
from jaxpt.sampling import generate
from jaxpt.serving.backend import cut_at_stop
from jaxpt.serving.live import serve_in_thread
from jaxpt.serving.protocol import RequestError, parse_chat, parse_completion

MODEL = "tiny"
QUESTIONS = [f"What is {i} + {i + 1}?" for i in range(8)]
TEXTS = ["hello", "The sum of 2 and 3 is", "Once upon", "x =", "1 2 3", "Paris is", "abc",
         "def f("]

# A template that shows the tools it is given (the shipped one ignores them).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function.name') "
    "| join(', ') }}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
    "assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def served(tiny_dir):
    """(backend, base URL) of a server on the tiny model, in a thread of this process."""
    args = build_parser().parse_args(["--model", tiny_dir, "--served-model-name", MODEL,
                                      "--max-tokens-limit", "64"])
    backend = load_backend(args)
    running = serve_in_thread(backend)
    yield backend, running.base
    running.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _greedy(backend, prompt_ids, max_tokens=8):
    out = generate(backend.model, [prompt_ids], max_new_tokens=max_tokens, temperature=0.0,
                   eos_token_id=backend.eos_ids)
    return out.tokens[0], backend.tokenizer.decode(out.tokens[0], skip_special_tokens=True)


def _chat_ids(backend, question):
    return encode_prompt(backend.tokenizer, [{"role": "user", "content": question}])


def _post(base, path, body: bytes):
    request = urllib.request.Request(base + path, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_chat_reply_is_generates_reply_with_its_token_ids(served, client):
    backend, _ = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    tokens, text = _greedy(backend, _chat_ids(backend, QUESTIONS[0]))
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=8,
        temperature=0, extra_body={"return_token_ids": True},
    )
    choice = reply.choices[0]
    assert choice.message.content == text and choice.message.role == "assistant"
    assert choice.model_extra["token_ids"] == tokens
    assert reply.model_extra["prompt_token_ids"] == _chat_ids(backend, QUESTIONS[0])
    assert reply.usage.completion_tokens == len(tokens)
    assert choice.finish_reason == ("stop" if tokens[-1] in backend.eos_ids else "length")

    # Token ids in: the same reply without rendering the messages again.
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "ignored"}], max_tokens=8,
        temperature=0, extra_body={"prompt_token_ids": _chat_ids(backend, QUESTIONS[0])},
    )
    assert again.choices[0].message.content == text


def test_concurrent_streams_each_get_their_own_greedy_reply(served, client):
    """64 clients streaming at once: each gets exactly its prompt's greedy reply (none
    lost, duplicated or mixed up), and the engine decoded them together."""
    backend, _ = served
    texts = [f"{t} {i}" for i in range(8) for t in TEXTS]
    out = generate(backend.model, [backend.encode_text(t) for t in texts], max_new_tokens=12,
                   temperature=0.0, eos_token_id=backend.eos_ids)
    expected = [backend.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    assert len(set(expected)) >= 8  # the prompts lead the tiny model to different replies
    (engine,) = [e for c, e in backend.loop._engines.items() if c.greedy] or [None]
    steps_before = engine.stats.decode_steps if engine else 0

    def stream(question):
        pieces = list(client.completions.create(
            model=MODEL, prompt=question, max_tokens=12, temperature=0, stream=True,
        ))
        assert pieces[-1].choices[0].finish_reason in ("stop", "length")
        return "".join(c.choices[0].text for c in pieces)

    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        assert list(pool.map(stream, texts)) == expected
    (engine,) = [e for c, e in backend.loop._engines.items() if c.greedy]
    # One by one, 64 replies of up to 12 tokens take up to 64 x 11 decode steps.
    assert engine.stats.decode_steps - steps_before < 64 * 11 / 4

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=12,
        temperature=0, stream=True,
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == _greedy(
        backend, _chat_ids(backend, QUESTIONS[0]), 12)[1]


def test_logprobs_are_the_models_and_top_logprobs_rank_them(served, client):
    backend, _ = served
    tokens, _ = _greedy(backend, _chat_ids(backend, QUESTIONS[1]))
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=8,
        temperature=0, logprobs=True, top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == len(tokens)
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        # Greedy picks the most likely token: its log-prob is the best of the top ones.
        np.testing.assert_allclose(entry.logprob, tops[0], atol=1e-4)
        assert entry.top_logprobs[0].token == entry.token


def test_completions_take_token_ids_and_draw_n_seeded_samples(served, client):
    backend, _ = served
    prompt = backend.encode_text("The sum of 2 and 3 is")
    kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7,
                  "logprobs": 2}
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert len(texts) == 3 and texts == [c.text for c in second.choices]  # the seed decides
    for choice in first.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
        assert all(v <= 0 for v in choice.logprobs.token_logprobs)


def test_a_stream_of_n_choices_with_logprobs_is_the_whole_reply_in_pieces(served, client):
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[2]}],
              "max_tokens": 10, "temperature": 1.0, "n": 3, "seed": 11, "logprobs": True}
    whole = client.chat.completions.create(**kwargs)
    texts, logprobs, finishes = [""] * 3, [[], [], []], [None] * 3
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None:
                logprobs[choice.index] += [e.logprob for e in choice.logprobs.content]
            if choice.finish_reason is not None:
                assert finishes[choice.index] is None  # one last piece per choice
                finishes[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    for streamed, choice in zip(logprobs, whole.choices):
        np.testing.assert_allclose(streamed, [e.logprob for e in choice.logprobs.content],
                                   atol=1e-6)


def test_a_stop_string_ends_the_reply_before_it(served, client):
    kwargs = {"model": MODEL, "prompt": "The sum of 2 and 3 is", "max_tokens": 16, "temperature": 1.0,
                  "seed": 3}
    text = client.completions.create(**kwargs).choices[0].text
    assert len(text) >= 8, text  # a sampled reply of the tiny model: varied characters
    stop = text[4:6]
    cut = text[: text.find(stop)]
    reply = client.completions.create(**kwargs, stop=[stop])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"


def test_tools_are_rendered_by_the_chat_template(served):
    backend, _ = served
    tokenizer = backend.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = TOOLS_TEMPLATE
    try:
        tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
        request = parse_chat({"messages": [{"role": "user", "content": "2+2?"}],
                              "tools": tools}, backend.encode_chat, vocab_size=10**6,
                             max_tokens_limit=64)
        assert "Tools: calculator" in tokenizer.decode(request.prompt_ids)
    finally:
        tokenizer.chat_template = original


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/v1/chat/completions", b"{not json", "not JSON"),
    ("/v1/chat/completions", b'{"model": "tiny"}', "'messages'"),
    ("/v1/chat/completions", (b'{"messages": [{"role": "user", "content": "hi"}], '
                             b'"max_tokens": -1}'), "'max_tokens'"),
    ("/v1/chat/completions", (b'{"messages": [{"role": "user", "content": "hi"}], '
                             b'"max_tokens": 65}'), "'max_tokens'"),
    ("/v1/chat/completions", (b'{"messages": [{"role": "user", "content": "hi"}], '
                             b'"temperature": "hot"}'), "'temperature'"),
    ("/v1/chat/completions", (b'{"messages": [{"role": "user", "content": "hi"}], '
                             b'"top_logprobs": 2, "stream": true}'), "'top_logprobs'"),
    ("/v1/completions", b'{"prompt": [1, 2, 99999999]}', "99999999"),
    ("/v1/completions", b'{"prompt": ""}', "'prompt'"),
    ("/v1/completions", json.dumps({"prompt": [5] * 200, "max_tokens": 64, "stream": True})
     .encode(), "context of 256 tokens"),
    ("/v1/completions", b'[1, 2]', "JSON object"),
])
def test_a_malformed_request_is_a_400_naming_the_field(served, path, body, message):
    _backend, base = served
    status, reply = _post(base, path, body)
    assert status == 400 and message in reply["error"]["message"], reply
    status, _ = _post(base, "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}')
    assert status == 200  # and the server still serves


def test_a_client_leaving_mid_stream_frees_the_model(served):
    backend, base = served
    body = json.dumps({"messages": [{"role": "user", "content": "Count."}], "stream": True,
                       "max_tokens": 64, "temperature": 1.0}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    reply = urllib.request.urlopen(request, timeout=120)
    assert reply.readline().startswith(b"data: ")
    reply.close()  # gone after the first event
    start = time.monotonic()
    status, _ = _post(base, "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}')
    assert status == 200 and time.monotonic() - start < 60
    deadline = time.monotonic() + 30
    while backend.loop.busy_slots():  # the stream's slot and pages come back
        assert time.monotonic() < deadline, "the departed client still holds a slot"
        time.sleep(0.05)
    assert all(engine.pool.used == 0 for engine in backend.loop._engines.values())


def test_an_adapter_is_served_on_top_of_its_base_model(tiny_dir, tmp_path):
    """``--adapter``: the LoRA adapter is applied unmerged, and replies are those of the
    merged model."""
    import jax

    from jaxpt.models import load_model
    from jaxpt.models.lora import LoRASpec, adapted, add_adapters, merge_adapters
    from jaxpt.models.peft_io import write_adapter

    model = load_model(tiny_dir)
    add_adapters(model, LoRASpec(4, 8.0, targets=("q_proj", "v_proj")), seed=1)
    for i, lora in enumerate(adapted(model).values()):  # B starts at 0: make it matter
        lora.b[...] = 0.3 * jax.random.normal(jax.random.key(i), lora.b[...].shape)
    adapter_dir = write_adapter(model, str(tmp_path / "adapter"), base_model=tiny_dir,
                                dropout=0.0)
    args = build_parser().parse_args(["--model", tiny_dir, "--adapter", adapter_dir,
                                      "--slots", "4", "--max-seq-len", "128"])
    backend = load_backend(args)
    prompt = backend.encode_text("The sum of 2 and 3 is")
    request = parse_completion({"prompt": prompt, "max_tokens": 10, "temperature": 0},
                               backend.encode_text, vocab_size=backend.vocab_size,
                               max_tokens_limit=64)
    (choice,) = backend.complete(request)
    merged = generate(merge_adapters(model), [prompt], max_new_tokens=10, temperature=0.0,
                      eos_token_id=backend.eos_ids).tokens[0]
    base = generate(load_model(tiny_dir), [prompt], max_new_tokens=10, temperature=0.0,
                    eos_token_id=backend.eos_ids).tokens[0]
    assert choice.token_ids == merged and merged != base


def test_parsing_rules_without_a_server():
    encode = lambda messages, tools=None: [1, 2, 3]
    request = parse_chat({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_tokens": 5,
        "top_logprobs": 2}, encode, vocab_size=10, max_tokens_limit=8)
    assert request.logprobs and request.top_logprobs == 2 and request.max_tokens == 5
    assert request.temperature == 1.0 and request.n == 1  # the API's defaults
    with pytest.raises(RequestError, match="only text parts"):
        parse_chat({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                   encode, vocab_size=10, max_tokens_limit=8)
    completion = parse_completion({"prompt": [[4, 5]], "logprobs": 0}, encode,
                                  vocab_size=10, max_tokens_limit=8)
    assert completion.prompt_ids == [4, 5] and completion.logprobs
    assert cut_at_stop("one. two. three", ("two", ".")) == ("one", True)
    assert cut_at_stop("abc", ()) == ("abc", False)


# -------------------------------------------------------------- a judge over HTTP


def test_a_judge_at_a_url_gets_the_in_process_judges_replies(served):
    from jaxpt.judges import PairwiseJudge
    from jaxpt.judges.generator import ModelGenerator

    backend, base = served
    template = "Q: {question}\nA: {answer_a}\nB: {answer_b}\nBetter:"  # fits the tiny context
    judge = PairwiseJudge(f"{base}/v1", template=template, max_new_tokens=6, batch_size=4)
    local = ModelGenerator(backend.model, backend.tokenizer, max_new_tokens=6)
    prompts, a, b = ["What is 2+3?", "Say hi"], ["5", "hi"], ["6", "hello"]
    texts = [judge.render(p, x, y) for p, x, y in zip(prompts, a, b)]
    assert judge.generator(texts) == local(texts)
    verdicts = judge.judge(prompts, a, b)
    assert len(verdicts) == 2 and all(v.raw_ab is not None for v in verdicts)

    sent = judge.generator.requests
    assert judge.generator(texts) == local(texts)  # asked again: from the cache
    assert judge.generator.requests == sent
    assert judge.generator.model == MODEL  # the server's model, from /v1/models
    assert PairwiseJudge(f"{base}/v1?model=other").generator.model == "other"


def test_an_unreachable_endpoint_is_an_error_naming_it():
    from jaxpt.cli import is_user_error
    from jaxpt.judges.endpoint import EndpointError, EndpointGenerator

    url = f"http://127.0.0.1:{free_port()}/v1"
    generator = EndpointGenerator(url + "?model=m", retries=2, backoff_s=0.01, timeout_s=5)
    with pytest.raises(EndpointError, match=r"127\.0\.0\.1.*after 3 tries") as error:
        generator(["hi"])
    assert generator.requests == 3 and is_user_error(error.value)


def test_an_endpoint_error_status_is_retried_then_named(served):
    from jaxpt.judges.endpoint import EndpointError, EndpointGenerator

    _, base = served
    generator = EndpointGenerator(f"{base}/v1?model={MODEL}", max_new_tokens=100000,
                                  retries=2, backoff_s=0.01)
    with pytest.raises(EndpointError, match=r"HTTP 400.*max_tokens"):
        generator(["hi"])  # a 400 is the request's fault: not retried
    assert generator.requests == 1
