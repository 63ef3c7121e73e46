// The multiway demo page: text search, and caption / question / find-similar for an uploaded image.
// Plain DOM code, no build step and no third-party script: the server serves this file itself.
"use strict";

const $ = (id) => document.getElementById(id);
let upload = null; // the chosen File
let models = {};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(url, options) {
  const response = await fetch(url, options);
  let body;
  try { body = await response.json(); } catch (e) { body = { error: `${response.status} ${response.statusText}` }; }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function renderHits(hits, label) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of hits) {
    const figure = document.createElement("figure");
    figure.className = "hit";
    const img = document.createElement("img");
    img.src = hit.url;
    img.alt = hit.name;
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    caption.append(score, " ", hit.name);
    figure.append(img, caption);
    grid.append(figure);
  }
  $("search-status").textContent = `${hits.length} results for ${label} — model: ${models.retrieval}`;
}

async function searchText(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) return;
  showError("");
  $("search-status").textContent = "searching…";
  try {
    const body = await api(`/api/search?q=${encodeURIComponent(q)}&topk=${$("topk").value}`);
    renderHits(body.hits, `“${q}”`);
  } catch (e) { showError(`search: ${e.message}`); $("search-status").textContent = ""; }
}

function imageForm(extra) {
  const form = new FormData();
  form.append("image", upload);
  for (const [k, v] of Object.entries(extra || {})) form.append(k, v);
  return form;
}

async function captionIt() {
  showError("");
  $("caption-out").textContent = "…";
  try {
    const body = await api("/api/caption", { method: "POST", body: imageForm() });
    $("caption-out").replaceChildren(body.caption || "(empty)", " ", small(`model: ${body.model}`));
  } catch (e) { showError(`caption: ${e.message}`); $("caption-out").textContent = "—"; }
}

async function askIt(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !upload) return;
  showError("");
  $("vqa-out").textContent = "…";
  try {
    const body = await api("/api/vqa", { method: "POST", body: imageForm({ question }) });
    $("vqa-out").replaceChildren(body.answer, " ", small(`model: ${body.model}`));
  } catch (e) { showError(`vqa: ${e.message}`); $("vqa-out").textContent = "—"; }
}

async function similar() {
  showError("");
  $("search-status").textContent = "searching…";
  try {
    const body = await api("/api/search", { method: "POST", body: imageForm({ topk: $("topk").value }) });
    renderHits(body.hits, `your image (${upload.name})`);
  } catch (e) { showError(`similar: ${e.message}`); $("search-status").textContent = ""; }
}

function small(text) {
  const el = document.createElement("small");
  el.textContent = text;
  return el;
}

function choose(file) {
  if (!file) return;
  upload = file;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = file.name;
  $("caption-btn").disabled = !models.captioner;
  $("vqa-btn").disabled = !models.vqa;
  $("similar-btn").disabled = !models.retrieval;
  $("caption-out").textContent = "—";
  $("vqa-out").textContent = "—";
}

async function start() {
  try {
    const health = await api("/api/health");
    models = health.models;
    const parts = Object.entries(models).filter(([, name]) => name).map(([role, name]) => `${role}: ${name}`);
    if (health.index) parts.push(`index: ${health.index.vectors} images (${health.index.kind})`);
    $("models").textContent = parts.join(" · ") || "no models loaded";
  } catch (e) { showError(`health: ${e.message}`); }
  $("search-form").addEventListener("submit", searchText);
  $("vqa-form").addEventListener("submit", askIt);
  $("caption-btn").addEventListener("click", captionIt);
  $("similar-btn").addEventListener("click", similar);
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]); });
}

start();
