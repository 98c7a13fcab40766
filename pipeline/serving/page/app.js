// The search page: one image (dropped or picked) or one text query -> POST /search -> a grid of result cards.
// Markup is built with textContent only: labels and texts come from the bundle and are never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function searchUrl() {
  const params = new URLSearchParams({ k: $("k").value, rerank: $("rerank").value });
  const filter = $("filter").value.trim();
  if (filter) params.append("filter", filter);
  return "/search?" + params.toString();
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

async function runSearch(body, headers, what) {
  setStatus("searching " + what + "…");
  $("results").replaceChildren();
  let response, payload;
  try {
    response = await fetch(searchUrl(), { method: "POST", body: body, headers: headers || {} });
    payload = await response.json();
  } catch (err) {
    setStatus("the server did not answer (" + err.message + ")", true);
    return;
  }
  if (!response.ok) {
    setStatus("error " + response.status + ": " + (payload.error || "unknown"), true);
    return;
  }
  showResults(payload);
}

function showResults(payload) {
  const cards = payload.results.map((hit) => {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = hit.image;
    img.alt = hit.label_name || hit.id;
    img.loading = "lazy";
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = "#" + hit.rank + " · " + hit.score.toFixed(3);
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = hit.label_name || String(hit.label ?? "");
    label.title = hit.text || hit.id;
    meta.append(score, label);
    card.append(img, meta);
    return card;
  });
  $("results").replaceChildren(...cards);
  const rerank = payload.rerank !== "off" ? ", re-rank: " + payload.rerank : "";
  setStatus(payload.results.length + " results in " + payload.took_ms.toFixed(1) + " ms (" + payload.query +
            " query" + rerank + ", bundle " + payload.bundle_version + ")");
}

function searchImage(file) {
  if (!file) return;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("image", file, file.name || "query");
  runSearch(form, null, "by image");
}

async function loadHealth() {
  try {
    const health = await (await fetch("/health")).json();
    $("bundle-info").textContent = health.items + " items · " + (health.backbone || "model") + " · bundle " +
      health.bundle_version + (health.has_text ? " · image or text queries" : " · image queries");
    $("text-form").hidden = !health.has_text;
  } catch (err) {
    $("bundle-info").textContent = "cannot reach /health (" + err.message + ")";
  }
}

function wire() {
  const zone = $("drop-zone");
  $("image-input").addEventListener("change", (e) => searchImage(e.target.files[0]));
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("image-input").click(); });
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (e) => {
    e.preventDefault();
    zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    searchImage(e.dataTransfer.files[0]);
  });
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text-input").value.trim();
    if (text) runSearch(JSON.stringify({ text: text }), { "Content-Type": "application/json" }, "by text");
  });
  loadHealth();
}

document.addEventListener("DOMContentLoaded", wire);
