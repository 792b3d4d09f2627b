// The writing page: sends the story to /api/generate and shows the candidates as their tokens stream in.
// No framework and no build step; everything here is served by serve.py, nothing comes from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const PROMPT_TAIL = 80;  // characters of the story shown (dimmed) before each candidate's new text
const SETTINGS = ["max_new_tokens", "num_samples", "temperature", "top_k", "top_p", "repetition_penalty", "seed"];
let info = null;  // /api/info: model, defaults, limits, copy check
let run = null;   // the generation in progress: {controller, id, cards, tokens, clicked, firstAt, stopTimer}

function setState(text, busy) {
  $("state").textContent = text;
  $("state").classList.toggle("busy", Boolean(busy));
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function updateCount() {
  $("count").textContent = `${Array.from($("story").value).length} 字`;
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    info = await response.json();
  } catch (e) {
    $("model").textContent = "the server does not answer; is serve.py running?";
    return;
  }
  $("model").textContent = info.model;
  for (const [key, value] of Object.entries(info.defaults)) {
    if ($(key) && value !== null) $(key).value = value;
  }
  $("max_new_tokens").max = info.limits.max_new_tokens;
  $("copyinfo").textContent = info.copy_check
    ? `Marked: spans of ${info.copy_check.min_copy}+ characters found verbatim in ${info.copy_check.dataset}.`
    : "Copy check off: the training text of this model is not available.";
}

function readSettings() {
  const body = {};
  for (const key of SETTINGS) {
    const raw = $(key).value.trim();
    if (raw === "") continue;  // seed left empty: a random one, reported back by the server
    body[key] = key === "temperature" || key === "top_p" || key === "repetition_penalty" ? Number(raw) : parseInt(raw, 10);
  }
  return body;
}

function storyPrompt() {
  // the model reads only the end of a long story, so only the end is sent
  const limit = info ? info.limits.max_prompt_chars : 20000;
  const chars = Array.from($("story").value);
  return chars.slice(-limit).join("") || "[CLS]";  // [CLS] begins a new text
}

function makeCards(n, promptText) {
  const area = $("candidates");
  area.replaceChildren();
  area.style.setProperty("--n", n);
  const chars = Array.from(promptText === "[CLS]" ? "" : promptText);
  const tail = (chars.length > PROMPT_TAIL ? "…" : "") + chars.slice(-PROMPT_TAIL).join("");
  const cards = [];
  for (let i = 0; i < n; i++) {
    const node = $("candidate-template").content.firstElementChild.cloneNode(true);
    node.querySelector(".head b").textContent = `Candidate ${i + 1}`;
    node.querySelector(".prompt").textContent = tail;
    const card = {node, gen: node.querySelector(".gen"), note: node.querySelector(".note"), text: ""};
    node.querySelector(".use").addEventListener("click", () => useCandidate(card));
    area.appendChild(node);
    cards.push(card);
  }
  return cards;
}

function useCandidate(card) {
  const story = $("story");
  story.value += card.text;
  story.scrollTop = story.scrollHeight;
  card.node.classList.add("used");
  localStorage.setItem("novelgpt-story", story.value);
  updateCount();
}

function markCopies(card, found) {
  // spans are [start, end) offsets in characters (code points), possibly overlapping: merge, then wrap
  const chars = Array.from(card.text);
  const spans = found.spans.map((s) => s.slice()).sort((a, b) => a[0] - b[0]);
  const merged = [];
  for (const span of spans) {
    const last = merged[merged.length - 1];
    if (last && span[0] <= last[1]) last[1] = Math.max(last[1], span[1]);
    else merged.push(span);
  }
  const parts = [];
  let at = 0;
  for (const [start, end] of merged) {
    parts.push(document.createTextNode(chars.slice(at, start).join("")));
    const mark = document.createElement("mark");
    mark.className = "copied";
    mark.title = "found verbatim in the training text";
    mark.textContent = chars.slice(start, end).join("");
    parts.push(mark);
    at = end;
  }
  parts.push(document.createTextNode(chars.slice(at).join("")));
  card.gen.replaceChildren(...parts);
  const longest = found.longest ? found.longest[1] - found.longest[0] : 0;
  card.note.textContent = longest
    ? `copied: longest ${longest} chars, ${Math.round(found.share * 100)}% of the text`
    : "no copied span";
}

function handleEvent(name, data) {
  if (name === "job") {
    run.id = data.id;
    $("seed").placeholder = `random (this one: ${data.seed})`;
  } else if (name === "queue") {
    setState(data.ahead > 0 ? `waiting, ${data.ahead} ahead` : "starting…", true);
  } else if (name === "start") {
    setState("writing…", true);
  } else if (name === "tokens") {
    if (run.firstAt === null) run.firstAt = performance.now();
    for (const [row, piece] of data.pieces) {
      const card = run.cards[row];
      card.text += piece;
      card.gen.appendChild(document.createTextNode(piece));
    }
    run.tokens += data.pieces.length;
    const seconds = (performance.now() - run.firstAt) / 1000;
    if (seconds > 0.2) $("rate").textContent = `${(run.tokens / seconds).toFixed(1)} tokens/s`;
  } else if (name === "done") {
    const first = run.firstAt === null ? "" : `first character after ${Math.round(run.firstAt - run.clicked)} ms · `;
    $("rate").textContent = `${first}${data.tokens} tokens in ${data.seconds.toFixed(2)} s, ${data.tokens_per_second} tokens/s`;
    (data.copies || []).forEach((found, row) => markCopies(run.cards[row], found));
    setState(data.stopped ? "stopped" : "done");
  } else if (name === "error") {
    showError(data.message);
  }
}

async function readEvents(response) {
  // server-sent events over a POST: blocks separated by a blank line, each "event: name" + "data: json"
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) handleEvent(name, JSON.parse(data));
    }
  }
}

async function write() {
  if (run) return;
  showError("");
  const body = {prompt: storyPrompt(), ...readSettings()};
  run = {controller: new AbortController(), id: null, tokens: 0, clicked: performance.now(), firstAt: null,
         cards: makeCards(body.num_samples || 1, body.prompt), stopTimer: null};
  $("write").disabled = true;
  $("stop").disabled = false;
  setState("sending…", true);
  try {
    const response = await fetch("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                   body: JSON.stringify(body), signal: run.controller.signal});
    if (!response.ok) {
      const answer = await response.json().catch(() => ({}));
      showError(answer.error || `the server answered ${response.status}`);
      setState("ready");
    } else {
      await readEvents(response);
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(`connection lost: ${e.message}`);
    setState("stopped");
  } finally {
    clearTimeout(run.stopTimer);
    for (const card of run.cards) card.node.querySelector(".use").disabled = false;
    run = null;
    $("write").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (!run) return;
  $("stop").disabled = true;
  setState("stopping…", true);
  if (run.id === null) {
    run.controller.abort();  // not started yet: closing the connection takes it out of the queue
    return;
  }
  // ask the server to stop, so the text so far still gets its copy check; abort if it does not end soon
  fetch("/api/stop", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({id: run.id})})
    .catch(() => {});
  const current = run;
  run.stopTimer = setTimeout(() => current.controller.abort(), 2000);
}

function download() {
  const blob = new Blob([$("story").value], {type: "text/plain;charset=utf-8"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "story.txt";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function copyStory() {
  try {
    await navigator.clipboard.writeText($("story").value);
  } catch (e) {  // no clipboard permission: select the text so that Ctrl+C copies it
    $("story").select();
    document.execCommand("copy");
  }
  setState("story copied");
}

$("write").addEventListener("click", write);
$("stop").addEventListener("click", stop);
$("download").addEventListener("click", download);
$("copy").addEventListener("click", copyStory);
$("story").addEventListener("input", () => {
  localStorage.setItem("novelgpt-story", $("story").value);
  updateCount();
});
$("story").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    write();
  }
});
$("story").value = localStorage.getItem("novelgpt-story") || "";
updateCount();
loadInfo();
