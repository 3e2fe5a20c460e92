// The try-it page: plain JavaScript, no build step, no CDN. Talks to GET /model and POST /classify.
"use strict";

const $ = (id) => document.getElementById(id);
// Uploads in flight at once; the rest wait here, not in the browser: a hundred dropped images
// would otherwise all be sent at once, past the server's LCNET_MAX_QUEUED_IMAGES (503), and a
// card's latency would count its wait for one of the browser's 6 connections.
const IN_FLIGHT = 4;
// A 503 (the worker is busy) is sent again after its Retry-After (at most MAX_WAIT_S), this many
// times, before its card shows it.
const RETRIES = 4;
const MAX_WAIT_S = 10;
let limits = { max_body_bytes: 20 * 1024 * 1024 };
let shown = null; // the X-Model-Version of the /model answer the header shows
let refreshing = null;
let waiting = []; // [file, card] not sent yet
let inFlight = 0;
let batch = new AbortController(); // "clear results" aborts what waits and what is in flight
const tally = { total: 0, classified: 0, failed: 0 };

function percent(value) {
  return value === null || value === undefined ? "—" : `${(100 * value).toFixed(1)} %`;
}

function text(tag, className, content) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (content !== undefined) node.textContent = content;
  return node;
}

async function loadModel() {
  const box = $("model");
  try {
    const response = await fetch("/model");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const info = await response.json();
    shown = response.headers.get("X-Model-Version");
    limits = info.limits || limits;
    const [name, version] = (info.tag || "exported folder").split(":");
    const facts = [
      ["model", name], ["version", version || "—"], ["architecture", info.architecture || "—"],
      ["classes", info.labels.length], ["val top-1", percent(info.val_top1)],
      ["test top-1", percent(info.test_top1)], ["engine", info.engine],
    ];
    // One <div> per fact, so that a narrow screen wraps between facts, not inside one.
    box.replaceChildren(...facts.map(([k, v]) => {
      const fact = document.createElement("div");
      fact.append(text("dt", "", k), text("dd", "", String(v)));
      return fact;
    }));
  } catch (err) {
    shown = null;
    const fact = document.createElement("div");
    fact.append(text("dt", "", "model"), text("dd", "", `unavailable (${err.message})`));
    box.replaceChildren(fact);
  }
}

// Every answer names the version that produced it: after a reload (LCNET_RELOAD) the header
// would otherwise go on showing the version the page was opened on.
function noteVersion(card, version) {
  if (!version) return;
  const meta = card.querySelector(".version");
  meta.textContent = version.split(":").pop(); // the model's name is in the header
  meta.title = `answered by ${version}`;
  if (version !== shown && !refreshing) refreshing = loadModel().finally(() => { refreshing = null; });
}

function setState(card, state) {
  card.querySelector(".latency").textContent = state;
}

function showPredictions(card, predictions, ms) {
  card.classList.remove("pending");
  setState(card, `${ms.toFixed(1)} ms`);
  const list = text("div", "pred");
  for (const p of predictions) {
    const row = text("div", "row");
    row.append(text("span", "category", p.category), text("span", "score", percent(p.score)));
    const bar = text("div", "bar");
    bar.setAttribute("aria-hidden", "true"); // the score is in the row above, as text
    const fill = text("span");
    fill.style.width = `${Math.max(1, 100 * p.score)}%`;
    bar.append(fill);
    list.append(row, bar);
  }
  card.querySelector(".body").append(list);
  count("classified");
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("error");
  setState(card, "not classified");
  card.querySelector(".body").append(text("div", "message", message));
  count("failed");
}

// One line for everyone, and the only live region for screen readers: cards appearing one by
// one would each be read out whole.
function count(outcome) {
  if (outcome) tally[outcome] += 1;
  const { total, classified, failed } = tally;
  const left = total - classified - failed;
  const parts = [`${classified} classified`];
  if (failed) parts.push(`${failed} not classified`);
  if (left) parts.push(`${left} to go`);
  $("status").textContent = total ? `${total} image${total > 1 ? "s" : ""}: ${parts.join(", ")}` : "";
}

async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return `the server answered HTTP ${response.status}`;
}

function retryAfterSeconds(response) {
  const seconds = Number(response.headers.get("Retry-After")); // an HTTP date is NaN: 1 s
  return Math.min(Number.isFinite(seconds) && seconds > 0 ? seconds : 1, MAX_WAIT_S);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function card(file) {
  const node = text("article", "card pending");
  const img = document.createElement("img");
  img.alt = file.name;
  // The decoded picture stays on screen once loaded; the URL would pin the file's bytes in
  // memory until the page closes, also after "clear results".
  img.onload = () => URL.revokeObjectURL(img.src);
  img.onerror = () => {
    URL.revokeObjectURL(img.src);
    img.replaceWith(text("div", "noimg", "no preview")); // not an image
  };
  img.src = URL.createObjectURL(file);
  const body = text("div", "body");
  const name = text("div", "name", file.name);
  name.title = file.name; // a long one is cut short on the card
  const meta = text("div", "meta");
  meta.append(text("span", "latency", "waiting"), text("span", "version"));
  body.append(name, meta);
  node.append(img, body);
  return node;
}

// Why the file cannot be read (a DOMException's name, e.g. NotFoundError), or null. One byte is
// enough: the browser checks the file is still the one chosen before it reads any.
async function readFailure(file) {
  try {
    await file.slice(0, 1).arrayBuffer();
    return null;
  } catch (err) {
    return err.name || String(err);
  }
}

async function classify(file, card, signal) {
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("top_k", $("topk").value);
  for (let attempt = 0; ; attempt += 1) {
    setState(card, "classifying…");
    const start = performance.now();
    let response, answer;
    try {
      response = await fetch("/classify", { method: "POST", body: form, signal });
      answer = response.ok ? await response.json() : null;
    } catch (err) {
      if (signal.aborted) return;
      // fetch fails alike when the server is gone and when the browser cannot read the file it
      // is to send (a dropped folder, a file moved or deleted since it was chosen).
      const unreadable = await readFailure(file);
      showError(card, unreadable
        ? `Could not read ${file.name} (${unreadable}): a folder, or a file moved or deleted since it was chosen.`
        : `The server could not be reached (${err.message}).`);
      return;
    }
    const ms = performance.now() - start;
    noteVersion(card, response.headers.get("X-Model-Version"));
    if (response.status === 503 && attempt < RETRIES) {
      const wait = retryAfterSeconds(response);
      setState(card, `server busy, trying again in ${wait} s`);
      // Spread out, or the cards refused together all come back at the same moment.
      await sleep(1000 * wait * (1 + Math.random() / 2), signal);
      if (signal.aborted) return;
      continue;
    }
    if (answer) showPredictions(card, answer, ms);
    else showError(card, `Could not classify this file: ${await readError(response)}.`);
    return;
  }
}

function sendWaiting() {
  while (inFlight < IN_FLIGHT && waiting.length) {
    const [file, node] = waiting.shift();
    inFlight += 1;
    classify(file, node, batch.signal).finally(() => { inFlight -= 1; sendWaiting(); });
  }
}

function handle(files) {
  $("notice").hidden = true;
  const list = Array.from(files || []);
  if (!list.length) {
    $("notice").textContent = "No files were dropped — drop image files, or choose them.";
    $("notice").hidden = false;
    return;
  }
  const cards = list.map(card);
  $("results").prepend(...cards); // this drop's files in their order, above earlier ones
  tally.total += list.length;
  count();
  list.forEach((file, i) => {
    if (file.size > limits.max_body_bytes) {
      const mb = (n) => (n / 1024 / 1024).toFixed(1);
      showError(cards[i], `This file is too large (${mb(file.size)} MB; the limit is ${mb(limits.max_body_bytes)} MB).`);
    } else {
      waiting.push([file, cards[i]]);
    }
  });
  sendWaiting();
}

function clear() {
  batch.abort();
  batch = new AbortController();
  waiting = [];
  Object.assign(tally, { total: 0, classified: 0, failed: 0 });
  count();
  $("results").replaceChildren();
}

$("files").addEventListener("change", (event) => { handle(event.target.files); event.target.value = ""; });
$("clear").addEventListener("click", clear);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  handle(event.dataTransfer.files);
});
loadModel();
