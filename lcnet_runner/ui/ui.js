// The try-it page: plain JavaScript, no build step, no CDN. Talks to GET /model and POST /classify.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = { max_body_bytes: 20 * 1024 * 1024 };

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
    const fact = document.createElement("div");
    fact.append(text("dt", "", "model"), text("dd", "", `unavailable (${err.message})`));
    box.replaceChildren(fact);
  }
}

function showPredictions(card, predictions, ms) {
  card.classList.remove("pending");
  card.querySelector(".latency").textContent = `${ms.toFixed(1)} ms`;
  const list = text("div", "pred");
  for (const p of predictions) {
    const row = text("div", "row");
    row.append(text("span", "category", p.category), text("span", "score", percent(p.score)));
    const bar = text("div", "bar");
    const fill = text("span");
    fill.style.width = `${Math.max(1, 100 * p.score)}%`;
    bar.append(fill);
    list.append(row, bar);
  }
  card.querySelector(".body").append(list);
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("error");
  card.querySelector(".latency").textContent = "not classified";
  card.querySelector(".body").append(text("div", "message", message));
}

async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return `the server answered HTTP ${response.status}`;
}

async function classify(file) {
  const card = text("article", "card pending");
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
  body.append(name, text("div", "latency"));
  card.append(img, body);
  $("results").prepend(card);

  if (file.size > limits.max_body_bytes) {
    const mb = (n) => (n / 1024 / 1024).toFixed(1);
    showError(card, `This file is too large (${mb(file.size)} MB; the limit is ${mb(limits.max_body_bytes)} MB).`);
    return;
  }
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("top_k", $("topk").value);
  const start = performance.now();
  try {
    const response = await fetch("/classify", { method: "POST", body: form });
    const ms = performance.now() - start;
    if (response.ok) showPredictions(card, await response.json(), ms);
    else showError(card, `Could not classify this file: ${await readError(response)}.`);
  } catch (err) {
    showError(card, `The server could not be reached (${err.message}).`);
  }
}

function handle(files) {
  $("notice").hidden = true;
  const list = Array.from(files || []);
  if (!list.length) {
    $("notice").textContent = "No files were dropped — drop image files, or choose them.";
    $("notice").hidden = false;
  }
  list.forEach(classify);
}

$("files").addEventListener("change", (event) => { handle(event.target.files); event.target.value = ""; });
$("clear").addEventListener("click", () => $("results").replaceChildren());
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  handle(event.dataTransfer.files);
});
loadModel();
