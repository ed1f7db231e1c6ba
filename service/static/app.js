// The search page: POST /search with {text} or {images: [base64]}, results rendered with textContent only
// (metadata is user data: never parsed as HTML).
"use strict";
const $ = (id) => document.getElementById(id);
const keyBox = $("key");
keyBox.value = sessionStorage.getItem("aim-api-key") || "";
keyBox.addEventListener("change", () => sessionStorage.setItem("aim-api-key", keyBox.value));

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function thumbnailSrc(meta) {
  // An inline data: thumbnail stored with the item, or an http(s) URL; anything else is not loaded.
  if (!meta) return null;
  const t = meta.thumbnail, u = meta.url;
  if (typeof t === "string" && t.startsWith("data:image/")) return t;
  if (typeof u === "string" && /^https?:\/\//.test(u)) return u;
  return null;
}

function render(result) {
  const list = $("results");
  list.replaceChildren();
  result.ids.forEach((id, i) => {
    const meta = result.metadata[i] || {};
    const li = document.createElement("li");
    li.className = "hit";
    const src = thumbnailSrc(meta);
    if (src) {
      const img = document.createElement("img");
      img.src = src;
      img.alt = id;
      img.loading = "lazy";
      li.append(img);
    } else {
      const none = document.createElement("div");
      none.className = "noimg";
      none.textContent = "no thumbnail";
      li.append(none);
    }
    const name = document.createElement("div");
    name.className = "id";
    name.textContent = id;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = "score " + result.scores[i].toFixed(4);
    const rest = Object.fromEntries(Object.entries(meta).filter(([k]) => k !== "thumbnail"));
    const metaBox = document.createElement("div");
    metaBox.className = "meta";
    metaBox.textContent = Object.keys(rest).length ? JSON.stringify(rest, null, 1) : "";
    li.append(name, score, metaBox);
    list.append(li);
  });
}

async function search(body) {
  const headers = { "Content-Type": "application/json" };
  if (keyBox.value) headers["Authorization"] = "Bearer " + keyBox.value;
  body.k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 8));
  status("searching...");
  const t0 = performance.now();
  let res;
  try {
    res = await fetch("/search", { method: "POST", headers, body: JSON.stringify(body) });
  } catch (err) {
    status("network error: " + err, true);
    return;
  }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = data.error || {};
    status(`${res.status} ${e.code || ""}: ${e.message || res.statusText}`, true);
    return;
  }
  render(data.results[0]);
  const n = data.results[0].ids.length;
  status(`${n} result${n === 1 ? "" : "s"} in ${Math.round(performance.now() - t0)} ms`);
}

$("search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("query").value.trim();
  if (text) search({ text });
});

function searchFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => search({ images: [String(reader.result).split(",", 2)[1]] });
  reader.readAsDataURL(file);
}

const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  searchFile(ev.dataTransfer.files[0]);
});
$("file").addEventListener("change", (ev) => searchFile(ev.target.files[0]));
