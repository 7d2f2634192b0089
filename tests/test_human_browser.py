"""The human-evaluation page in a real browser: export it, open it in headless Chromium,
judge with clicks and keys, type a note, save, capture the download and read it back with
``python -m jaxpt.human ratings``.

Uses the system's Chromium (/usr/bin/chromium, never a downloaded browser) through
Playwright; skips when either is missing.
"""

import json
import os
import shutil

import pytest

from jaxpt.cli import human as human_cli
from jaxpt.human import page_items, read_pairs

CHROMIUM = "/usr/bin/chromium"

PAIRS = [
    {"id": "q1", "prompt": "What is 2+2?", "response_a": "4", "response_b": "5",
     "model_a": "good", "model_b": "bad"},
    {"id": "q2", "prompt": "Capital of France?", "response_a": "Paris",
     "response_b": "Lyon </script><b>x</b>", "model_a": "good", "model_b": "bad"},
    {"id": "q3", "prompt": [{"role": "user", "content": "Say hi"}], "response_a": "hi",
     "response_b": "hello", "model_a": "good", "model_b": "bad"},
    {"id": "q4", "prompt": "Skip me", "response_a": "a", "response_b": "b",
     "model_a": "good", "model_b": "bad"},
]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError as error:
        pytest.skip(f"the playwright package is not installed ({error})")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


def _export(tmp_path, seed):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    page = tmp_path / f"page{seed}.html"
    assert human_cli.main(["export", "--pairs", str(pairs), "--out", str(page),
                           "--seed", str(seed)]) == 0
    return page, page_items(read_pairs(str(pairs)), seed)


def _judge(browser, page_path, tmp_path, annotator, actions):
    """Open the page, act, save; returns the downloaded rows."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_path.as_uri())
    page.fill("#annotator", annotator)
    actions(page)
    with page.expect_download() as download_info:
        page.click("#save")
    target = tmp_path / f"{annotator}.jsonl"
    download_info.value.save_as(str(target))
    context.close()
    assert not errors
    return target, [json.loads(line) for line in target.read_text().splitlines()]


def test_page_round_trip_in_headless_chromium(browser, tmp_path, capsys):
    page_path, items = _export(tmp_path, seed=7)
    html = page_path.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    left = {item["id"]: item["left"]["model"] for item in items}
    right = {item["id"]: item["right"]["model"] for item in items}
    assert len({item["swapped"] for item in items}) == 2  # seed 7 swaps some, not all

    def ann_actions(page):
        # Item 1: a note, then "A better" by mouse (the left response wins).
        assert page.text_content("#prompt") == "What is 2+2?"
        page.fill("#note", "left is right")
        page.click("#choose-left")
        # Item 2 by keyboard: "2" = B better. Its text is shown as text, not markup.
        page.click("#prompt")
        assert "</script><b>x</b>" in page.text_content("#left") + page.text_content("#right")
        page.keyboard.press("2")
        assert page.text_content("#prompt") == "Say hi"  # chat prompt shown as its text
        page.click("#choose-tie")
        page.keyboard.press("s")  # skip item 4: not saved
        assert page.text_content("#progress").startswith("3 / 4")

    ann_file, ann_rows = _judge(browser, page_path, tmp_path, "ann", ann_actions)
    by_id = {r["id"]: r for r in ann_rows}
    assert set(by_id) == {"q1", "q2", "q3"}
    assert by_id["q1"]["choice"] == "left" and by_id["q1"]["winner"] == left["q1"]
    assert by_id["q1"]["note"] == "left is right"
    assert by_id["q2"]["choice"] == "right" and by_id["q2"]["winner"] == right["q2"]
    assert by_id["q3"]["choice"] == "tie" and by_id["q3"]["winner"] == "tie"
    for row in ann_rows:
        assert row["annotator"] == "ann" and row["timestamp"].endswith("Z")
        assert (row["left_model"], row["right_model"]) == (left[row["id"]], right[row["id"]])
        expected = {"good": 1.0, "bad": 0.0, "tie": 0.5}[row["winner"]]
        assert row["score_a"] == expected

    def bob_actions(page):  # keyboard only: "good" wins q1 and q2, q3 a tie, q4 skipped
        page.keyboard.press("Escape")  # leaves the annotator field, so keys judge again
        for item in items[:2]:
            page.keyboard.press("1" if item["left"]["model"] == "good" else "2")
        page.keyboard.press("t")
        page.keyboard.press("0")

    bob_file, bob_rows = _judge(browser, page_path, tmp_path, "bob", bob_actions)
    assert [r["winner"] for r in bob_rows] == ["good", "good", "tie"]

    assert human_cli.main(["ratings", str(ann_file), str(bob_file), "--bootstrap", "20"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    winners = [r["winner"] for r in ann_rows] + [r["winner"] for r in bob_rows]
    models = summary["models"]
    assert models["good"]["wins"] == winners.count("good")
    assert models["bad"]["wins"] == winners.count("bad")
    assert models["good"]["ties"] == winners.count("tie") == 2
    assert summary["n_judgements"] == 6 and summary["annotators"] == ["ann", "bob"]
    # Both annotators judged q1..q3: they agree where ann's clicks match bob's.
    agree = sum(by_id[r["id"]]["winner"] == r["winner"] for r in bob_rows) / 3
    assert summary["agreement"]["overlapping_items"] == 3
    assert summary["agreement"]["percent_agreement"] == pytest.approx(agree)
    assert (models["good"]["bt"] > models["bad"]["bt"]) == (
        winners.count("good") > winners.count("bad"))


def test_save_needs_an_annotator_and_progress_survives_a_reload(browser, tmp_path):
    page_path, _ = _export(tmp_path, seed=0)
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto(page_path.as_uri())
    page.click("#prompt")
    page.keyboard.press("1")
    page.click("#save")
    assert "annotator" in page.text_content("#message")
    page.reload()
    assert page.text_content("#progress").startswith("1 / 4")
    context.close()
