"""The human-evaluation page: one HTML file with inline CSS and JS and no network access.

``__TITLE__`` and ``__DATA__`` (``{"page": id, "items": [...]}`` as JSON) are filled in by
``jaxpt.human.export``. Texts are inserted with ``textContent`` only, so model output can
never become markup. Progress is kept in the browser's localStorage (per page id), so a
reload does not lose work; "Save results" downloads one jsonl row per judged item.
"""

PAGE_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f5f5f7; color: #222; }
  header { background: #fff; border-bottom: 1px solid #ddd; padding: 10px 20px;
           display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0 12px 0 0; }
  main { max-width: 1200px; margin: 0 auto; padding: 16px 20px; }
  .box { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 12px 16px;
         margin-bottom: 12px; }
  .label { font-size: 12px; font-weight: 600; color: #666; text-transform: uppercase;
           margin-bottom: 6px; }
  .text { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, monospace;
          font-size: 14px; line-height: 1.45; }
  .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
  @media (max-width: 800px) { .pair { grid-template-columns: 1fr; } }
  .choices { display: flex; gap: 8px; flex-wrap: wrap; margin: 8px 0 12px; }
  button { font-size: 15px; padding: 8px 14px; border-radius: 6px; border: 1px solid #aaa;
           background: #fff; cursor: pointer; }
  button.chosen { background: #2b6cb0; color: #fff; border-color: #2b6cb0; }
  button.save { background: #2f855a; color: #fff; border-color: #2f855a; }
  kbd { font-size: 11px; border: 1px solid #bbb; border-radius: 3px; padding: 0 3px;
        background: #f0f0f0; color: #333; }
  #note { width: 100%; box-sizing: border-box; font-size: 14px; padding: 6px; }
  #progress { font-weight: 600; }
  #position { text-transform: none; font-weight: 400; }
  #message { color: #b7410e; }
  .help { color: #666; font-size: 13px; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <label>Annotator <input id="annotator" placeholder="your name" autocomplete="off"></label>
  <span id="progress"></span>
  <button id="save" class="save">Save results</button>
  <span id="message" role="status"></span>
</header>
<main>
  <div class="box"><div class="label">Prompt <span id="position"></span></div>
    <div id="prompt" class="text"></div></div>
  <div class="choices">
    <button id="choose-left" data-choice="left"><kbd>1</kbd> A better</button>
    <button id="choose-right" data-choice="right"><kbd>2</kbd> B better</button>
    <button id="choose-tie" data-choice="tie"><kbd>3</kbd> Tie</button>
    <button id="choose-skip" data-choice="skip"><kbd>0</kbd> Skip</button>
    <button id="prev"><kbd>&larr;</kbd> Previous</button>
    <button id="next">Next <kbd>&rarr;</kbd></button>
  </div>
  <div class="pair">
    <div class="box"><div class="label">Response A</div><div id="left" class="text"></div></div>
    <div class="box"><div class="label">Response B</div><div id="right" class="text"></div></div>
  </div>
  <div class="box"><div class="label">Note (optional) <kbd>N</kbd></div>
    <input id="note" autocomplete="off" placeholder="why? (optional)"></div>
  <p class="help">Keys: <kbd>1</kbd>/<kbd>A</kbd> A better, <kbd>2</kbd>/<kbd>B</kbd> B better,
    <kbd>3</kbd>/<kbd>T</kbd> tie, <kbd>0</kbd>/<kbd>S</kbd> skip, <kbd>&larr;</kbd>/<kbd>&rarr;</kbd>
    previous/next, <kbd>N</kbd> write a note, <kbd>Esc</kbd> leave a text field.
    Progress is kept in this browser; press "Save results" to download it.</p>
</main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const ITEMS = DATA.items;
const STORE = "jaxpt-human:" + DATA.page;
const el = (id) => document.getElementById(id);
let state = { index: 0, annotator: "", choices: {}, notes: {} };
try { state = Object.assign(state, JSON.parse(localStorage.getItem(STORE) || "{}")); }
catch (e) { /* storage unavailable or corrupt: start fresh */ }
state.index = Math.min(Math.max(state.index | 0, 0), ITEMS.length - 1);

function persist() {
  try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (e) { /* private mode */ }
}

function judged() {
  return ITEMS.filter((it) => (state.choices[it.id] || {}).choice &&
                              state.choices[it.id].choice !== "skip").length;
}

function render() {
  const item = ITEMS[state.index];
  el("position").textContent = "(" + (state.index + 1) + " of " + ITEMS.length +
                               ", id " + item.id + ")";
  el("prompt").textContent = item.prompt;
  el("left").textContent = item.left.text;
  el("right").textContent = item.right.text;
  el("note").value = state.notes[item.id] || "";
  el("annotator").value = state.annotator;
  const chosen = (state.choices[item.id] || {}).choice;
  for (const b of document.querySelectorAll("[data-choice]")) {
    b.classList.toggle("chosen", b.dataset.choice === chosen);
  }
  el("progress").textContent = judged() + " / " + ITEMS.length + " judged";
}

function go(delta) {
  state.index = Math.min(Math.max(state.index + delta, 0), ITEMS.length - 1);
  persist(); render();
}

function nextOpen() {
  for (let step = 1; step <= ITEMS.length; step++) {
    const i = (state.index + step) % ITEMS.length;
    if (!state.choices[ITEMS[i].id]) return i;
  }
  return Math.min(state.index + 1, ITEMS.length - 1);
}

function choose(choice) {
  const item = ITEMS[state.index];
  state.choices[item.id] = { choice: choice, timestamp: new Date().toISOString() };
  state.index = nextOpen();
  el("message").textContent = "";
  persist(); render();
}

function resultRows() {
  const rows = [];
  for (const item of ITEMS) {
    const c = state.choices[item.id];
    if (!c || c.choice === "skip") continue;
    const winner = c.choice === "tie" ? "tie" : item[c.choice].model;
    rows.push({
      id: item.id, left_model: item.left.model, right_model: item.right.model,
      choice: c.choice, winner: winner, model_a: item.model_a, model_b: item.model_b,
      score_a: winner === "tie" ? 0.5 : (winner === item.model_a ? 1 : 0),
      note: state.notes[item.id] || "", annotator: state.annotator, timestamp: c.timestamp,
      page: DATA.page,
    });
  }
  return rows;
}

function save() {
  if (!state.annotator.trim()) {
    el("message").textContent = "Enter your name as annotator first.";
    el("annotator").focus();
    return;
  }
  const rows = resultRows();
  if (!rows.length) { el("message").textContent = "Nothing judged yet."; return; }
  const text = rows.map((r) => JSON.stringify(r)).join("\n") + "\n";
  const url = URL.createObjectURL(new Blob([text], { type: "application/jsonl" }));
  const a = document.createElement("a");
  const who = state.annotator.trim().replace(/[^A-Za-z0-9_-]+/g, "_");
  a.href = url;
  a.download = "human_eval_" + who + "_" + DATA.page + ".jsonl";
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
  el("message").textContent = "Saved " + rows.length + " judgements.";
}

for (const b of document.querySelectorAll("[data-choice]")) {
  b.addEventListener("click", () => choose(b.dataset.choice));
}
el("prev").addEventListener("click", () => go(-1));
el("next").addEventListener("click", () => go(1));
el("save").addEventListener("click", save);
el("annotator").addEventListener("input", (e) => { state.annotator = e.target.value; persist(); });
el("note").addEventListener("input", (e) => {
  state.notes[ITEMS[state.index].id] = e.target.value; persist();
});

const KEYS = { "1": "left", "a": "left", "2": "right", "b": "right", "3": "tie", "t": "tie",
               "0": "skip", "s": "skip" };
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement;
  if (typing) { if (e.key === "Escape" || e.key === "Enter") e.target.blur(); return; }
  const key = e.key.toLowerCase();
  if (KEYS[key]) { choose(KEYS[key]); e.preventDefault(); }
  else if (e.key === "ArrowRight") { go(1); e.preventDefault(); }
  else if (e.key === "ArrowLeft") { go(-1); e.preventDefault(); }
  else if (key === "n") { el("note").focus(); e.preventDefault(); }
});
render();
</script>
</body>
</html>
"""
