"""LLM judges: the both-orders combination with fake judges, the reply parsers, template
checks, the rubric judge as a reward function, and both judges end to end on the tiny model."""

import inspect
import math
import re

import pytest

from jaxpt.judges import (
    PAIRWISE_TEMPLATE,
    RUBRIC_TEMPLATE,
    PairwiseJudge,
    RubricJudge,
    TemplateError,
    agreement,
    combine,
    parse_score,
    parse_verdict,
    position_bias,
    question_text,
    rubric_reward,
    summarize,
)
from jaxpt.sampling import PromptSampler

PAIR_TEMPLATE = "Q: {question}\n[A] {answer_a}\n[B] {answer_b}\nVerdict?"
SHORT_RUBRIC_TEMPLATE = "{rubric}|{question}|{answer}|{min_score}-{max_score}"


def _answers(text):
    match = re.search(r"\[A\] (.*)\n\[B\] (.*)\nVerdict\?$", text)
    return match.group(1), match.group(2)


class Fake:
    """A judge replying with ``reply(answer_a, answer_b)``; records each batch it gets."""

    def __init__(self, reply):
        self.reply, self.batches = reply, []

    def __call__(self, texts):
        self.batches.append(list(texts))
        return [self.reply(*_answers(t)) for t in texts]


def _longer(a, b):
    label = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
    return f"A is {len(a)} long, B is {len(b)}.\nVerdict: {label}"


PAIRS = (["q1", "q2", "q3"], ["long answer", "s", "same"], ["short", "longer one", "four"])


def _judge(reply, **kwargs):
    fake = Fake(reply)
    return PairwiseJudge(template=PAIR_TEMPLATE, generator=fake, **kwargs), fake


def test_pure_position_bias_makes_every_pair_a_tie():
    judge, _ = _judge(lambda a, b: "Verdict: A")
    verdicts = judge.judge(*PAIRS)
    assert [v.winner for v in verdicts] == ["tie"] * 3
    assert [v.score_a for v in verdicts] == [0.5] * 3
    assert not any(v.consistent for v in verdicts)
    assert [(v.vote_ab, v.vote_ba) for v in verdicts] == [("a", "b")] * 3
    assert agreement(verdicts) == 0.0
    assert position_bias(verdicts) == 1.0


def test_a_judge_of_length_is_consistent():
    judge, _ = _judge(_longer)
    verdicts = judge.judge(*PAIRS)
    assert [v.winner for v in verdicts] == ["a", "b", "tie"]
    assert [v.score_a for v in verdicts] == [1.0, 0.0, 0.5]
    assert [v.consistent for v in verdicts] == [True, True, True]
    assert [(v.parsed_ab, v.parsed_ba) for v in verdicts] == [("A", "B"), ("B", "A"), ("tie",) * 2]
    assert agreement(verdicts) == 1.0
    assert position_bias(verdicts) == 0.5  # two "A" among four decisive replies
    stats = summarize(verdicts)
    assert stats["win_rate_a"] == 0.5 and stats["ties"] == 1 and stats["unparsed"] == 0


def test_an_unparseable_order_is_a_tie_vote_and_is_counted():
    # Answers in the original order are judged; the swapped order gets gibberish.
    judge, _ = _judge(lambda a, b: _longer(a, b) if a in PAIRS[1] else "I cannot decide")
    verdicts = judge.judge(*PAIRS)
    assert [v.winner for v in verdicts] == ["a", "b", "tie"]
    assert [v.score_a for v in verdicts] == [0.75, 0.25, 0.5]
    assert [v.unparsed_ab for v in verdicts] == [False] * 3
    assert [v.unparsed_ba for v in verdicts] == [True] * 3
    assert [v.raw_ba for v in verdicts] == ["I cannot decide"] * 3
    assert not any(v.consistent for v in verdicts)
    assert agreement(verdicts) == 0.0
    assert position_bias(verdicts) == 0.5  # "A" then "B": the third pair's "tie" is left out
    assert summarize(verdicts)["unparsed"] == 3


def test_a_tie_and_a_win_give_the_win_at_half_weight():
    verdict = combine("Verdict: tie", "Verdict: A")  # the swapped order's A is answer b
    assert (verdict.winner, verdict.score_a, verdict.consistent) == ("b", 0.25, False)
    verdict = combine("Verdict: A", "Verdict: tie")
    assert (verdict.winner, verdict.score_a) == ("a", 0.75)
    verdict = combine("nothing", "nothing either")
    assert (verdict.winner, verdict.score_a, verdict.consistent) == ("tie", 0.5, False)
    assert math.isnan(position_bias([verdict])) and math.isnan(agreement([]))


def test_both_orders_of_a_pair_share_one_generate_call():
    judge, fake = _judge(_longer, batch_size=5)  # rounded down to 4: two pairs per call
    judge.judge(*PAIRS)
    assert [len(b) for b in fake.batches] == [4, 2]
    first, swapped = fake.batches[0][:2]
    assert _answers(first) == ("long answer", "short")
    assert _answers(swapped) == ("short", "long answer")


@pytest.mark.parametrize(
    "text, label",
    [
        ("Verdict: B.", "B"),
        ("verdict:tie", "tie"),
        ("Both are fine, but A has an error.\n\nVerdict: B", "B"),
        ("**Verdict:** A", "A"),
        ("Final verdict: [[A]]", "A"),
        ("Verdict: Answer B is better", "B"),
        ('verdict = "b"', "B"),
        ("Verdict: it is a tie", None),
        ("Verdict: a tie", "tie"),
        ("Verdict: A\n...on reflection...\nVerdict: B", "B"),
        ("B", "B"),
        ("  Tie.  ", "tie"),
        ("[[A]]", "A"),
        ("I prefer the second answer.", None),
        ("Verdict: Both", None),
        ("My verdict about this", None),
        ("", None),
    ],
)
def test_parse_verdict(text, label):
    assert parse_verdict(text) == label


@pytest.mark.parametrize(
    "text, score",
    [
        ("Score: 7", 7.0),
        ("The answer is fine.\n**Score:** 8/10", 8.0),
        ("score=3.", 3.0),
        ("Final score is 9 out of 10", 9.0),
        ("Score: 2\nActually, Score: 6", 6.0),
        ("7", 7.0),
        (" 4/5 ", 4.0),
        ("Score: 7.5", 7.5),
        ("I would give it a seven", None),
        ("", None),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_template_errors_name_the_placeholder():
    with pytest.raises(TemplateError, match=r"lacks the placeholder \{answer_b\}"):
        PairwiseJudge(template="{question} {answer_a}", generator=Fake(_longer))
    with pytest.raises(TemplateError, match=r"unknown placeholder \{answr\}"):
        PairwiseJudge(template="{question} {answer_a} {answer_b} {answr}", generator=Fake(_longer))
    with pytest.raises(TemplateError, match="positional"):
        PairwiseJudge(template="{question} {answer_a} {answer_b} {}", generator=Fake(_longer))
    with pytest.raises(TemplateError, match="malformed"):
        PairwiseJudge(template="{question} {answer_a} {answer_b} {", generator=Fake(_longer))
    with pytest.raises(TemplateError, match=r"lacks the placeholder \{rubric\}"):
        RubricJudge(template="{question} {answer}", generator=Fake(_longer))
    with pytest.raises(TemplateError, match=r"\{rubric\} placeholder but rubric is None"):
        RubricJudge(template="{question} {answer} {rubric}", rubric=None, generator=Fake(_longer))
    RubricJudge(template="{question} {answer}", rubric=None, generator=Fake(_longer))
    # Braces in the values are safe; doubled braces in a template are literal.
    judge = PairwiseJudge(
        template="{{x}} {question} {answer_a} {answer_b}", generator=Fake(_longer)
    )
    assert judge.render("f({a})", "{}", "}") == "{x} f({a}) {} }"


def test_default_templates_render_and_chat_prompts_become_text():
    judge = PairwiseJudge(generator=Fake(_longer))
    text = judge.render([{"role": "user", "content": "2+2?"}], "4", "5")
    assert "2+2?" in text and "[Answer A]\n4" in text and "[Answer B]\n5" in text
    assert judge.template == PAIRWISE_TEMPLATE
    rubric = RubricJudge(generator=Fake(_longer), max_score=5)
    text = rubric.render("q", [{"role": "assistant", "content": "ans"}], rubric="be kind")
    assert "be kind" in text and "[Answer]\nans" in text and "from 1 to 5" in text
    assert rubric.template == RUBRIC_TEMPLATE
    conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert question_text(conversation) == "system: s\n\nuser: u"


def _rubric_fake(texts):
    # SHORT_RUBRIC_TEMPLATE: the reply is whatever the answer says.
    return [t.split("|")[2] for t in texts]


def test_rubric_scores_normalisation_and_range():
    judge = RubricJudge(
        template=SHORT_RUBRIC_TEMPLATE, generator=_rubric_fake, min_score=1, max_score=5
    )
    answers = ["Score: 1", "Score: 5", "Score: 3", "Score: 9", "no score", "Score: 0"]
    prompts = ["q"] * len(answers)
    assert judge.score(prompts, answers) == [1.0, 5.0, 3.0, None, None, None]
    normalized = judge.reward_fn(prompts=prompts, completions=answers)
    assert normalized == [0.0, 1.0, 0.5, None, None, None]
    details = judge.judge(prompts, answers)
    assert details[3].parsed == 9.0 and details[3].score is None
    with pytest.raises(ValueError, match="min_score < max_score"):
        RubricJudge(generator=_rubric_fake, min_score=3, max_score=3)


def test_reward_fn_has_trls_signature_and_reads_a_rubric_column():
    seen = []

    def fake(texts):
        seen.extend(texts)
        return ["Score: 10"] * len(texts)

    judge = RubricJudge(template=SHORT_RUBRIC_TEMPLATE, generator=fake, batch_size=2)
    params = inspect.signature(judge.reward_fn).parameters
    assert list(params)[:2] == ["prompts", "completions"]
    assert params["columns"].kind is inspect.Parameter.VAR_KEYWORD
    completions = [[{"role": "assistant", "content": c}] for c in ("x", "y", "z")]
    out = judge(
        prompts=["p1", "p2", "p3"],
        completions=completions,
        answer=[1, 2, 3],
        rubric=["r1", "r2", "r3"],
    )
    assert out == [1.0, 1.0, 1.0]
    assert seen == ["r1|p1|x|1-10", "r2|p2|y|1-10", "r3|p3|z|1-10"]


def test_judges_end_to_end_on_the_tiny_model(tiny_dir, monkeypatch):
    from tiny import TINY

    from jaxpt.data import tokenizer_for_model
    from jaxpt.models import init_model
    from jaxpt.rewards import build_reward_fns

    calls = []  # (prompts, sampling settings) of each sampler launch
    real_launch = PromptSampler.launch

    def spy(self, policy, prompts, key):
        calls.append((len(prompts), self.sampling))
        return real_launch(self, policy, prompts, key)

    monkeypatch.setattr(PromptSampler, "launch", spy)
    tokenizer = tokenizer_for_model(tiny_dir)
    model = init_model(TINY, seed=0)
    judge = PairwiseJudge(model, tokenizer, template=PAIR_TEMPLATE, max_new_tokens=8)
    verdicts = judge.judge(["2+2?", "Capital of France?"], ["4", "Paris"], ["5", "Rome"])
    assert len(calls) == 1 and calls[0][0] == 4  # both orders of both pairs in one call
    assert calls[0][1].greedy
    assert calls[0][1].eos_token_ids == (tokenizer.eos_token_id,)
    for v in verdicts:
        assert isinstance(v.raw_ab, str) and isinstance(v.raw_ba, str)
        assert v.winner in ("a", "b", "tie")
        assert v.score_a in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert v.parsed_ab in ("A", "B", "tie", None)

    rubric = RubricJudge(model, tokenizer, template=SHORT_RUBRIC_TEMPLATE, max_new_tokens=8)
    scores = rubric.score(["2+2?"] * 3, ["4", "5", "four"])
    assert len(calls) == 2 and calls[1][0] == 3 and len(scores) == 3
    assert all(s is None or 1 <= s <= 10 for s in scores)

    # From a config: the model is a path, loaded once and cached.
    [reward] = build_reward_fns(
        [
            {
                "fn": "jaxpt.judges:rubric_reward",
                "kwargs": {
                    "model": tiny_dir,
                    "template": SHORT_RUBRIC_TEMPLATE,
                    "max_new_tokens": 8,
                },
            }
        ]
    )
    for _ in range(2):
        values = reward.fn(prompts=["2+2?", "1+1?"], completions=["4", "2"], answer=["4", "2"])
        assert len(values) == 2 and all(v is None or 0.0 <= v <= 1.0 for v in values)
    assert [n for n, _ in calls[2:]] == [2, 2]
    assert rubric_reward.__module__ == "jaxpt.judges.rubric"


def test_a_judge_needs_a_model_and_a_tokenizer_for_a_loaded_model():
    with pytest.raises(ValueError, match="needs a model"):
        PairwiseJudge()
    with pytest.raises(ValueError, match="tokenizer object"):
        RubricJudge(object())
    with pytest.raises(ValueError, match="at least 2"):
        PairwiseJudge(generator=Fake(_longer), batch_size=1)
    PairwiseJudge("some/path")  # a path loads lazily: nothing is read yet
