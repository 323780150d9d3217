// The ragcache page: plain JavaScript over the service's own API (no framework, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "ragcache-token";
const state = { conversation: null, controller: null, sources: [], quotes: [], saved: [] };

// -- API --------------------------------------------------------------------------------------
function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.hint = error.hint || "";
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) {
    askForToken();
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, body);
  }
  return response;
}

function showError(error) {
  const box = $("error");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = error.hint ? `${error.message} (${error.hint})` : error.message;
  box.hidden = false;
}

function askForToken() {
  $("token-form").hidden = false;
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  showError(null);
  refreshStatus();
});

// -- tabs -------------------------------------------------------------------------------------
function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    if (tab.dataset.tab === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== name;
  if (name === "documents") loadDocuments();
  if (name === "cache") refreshCache();
  if (name === "batches") loadBatches();
}
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showTab(tab.dataset.tab));
}

async function refreshStatus() {
  try {
    const ready = await (await api("/ready")).json();
    $("status").textContent = `${ready.model} · ${ready.chunks} chunks`;
  } catch (error) {
    $("status").textContent = error.status === 401 ? "token needed" : error.message;
  }
}

// -- ask --------------------------------------------------------------------------------------
async function* sse(response) {
  // Server-Sent Events from a POST (EventSource only does GET): blank-line separated blocks.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function renderSources(sources) {
  state.sources = sources;
  const list = $("sources");
  list.replaceChildren();
  for (const s of sources) {
    const item = document.createElement("li");
    item.id = `source-${s.number}`;
    const link = document.createElement("a");
    link.href = `#source-${s.number}`;
    link.textContent = `[${s.number}] ${s.title || s.doc_id}`;
    link.addEventListener("click", (e) => { e.preventDefault(); openPassage(s.number); });
    const meta = document.createElement("span");
    meta.className = "meta";
    const heading = (s.heading_path || []).join(" › ");
    const cached = s.cached ? " · from cache" : "";
    meta.textContent = ` ${s.doc_id}${heading ? " · " + heading : ""} · score ${s.score.toFixed(3)}${cached}`;
    item.append(link, meta);
    list.append(item);
  }
}

function openPassage(number) {
  const source = state.sources.find((s) => s.number === number);
  if (!source) return;
  $("passage-title").textContent = `[${number}] ${source.title || source.doc_id}`;
  const text = source.text || "";
  const spans = state.quotes.filter((q) => q.number === number).sort((a, b) => a.start - b.start);
  const body = $("passage-text");
  body.replaceChildren();
  let at = 0;
  for (const q of spans) {
    if (q.start < at) continue;
    body.append(text.slice(at, q.start));
    const mark = document.createElement("mark");
    mark.textContent = text.slice(q.start, q.end);
    body.append(mark);
    at = q.end;
  }
  body.append(text.slice(at));
  $("passage").hidden = false;
  const first = body.querySelector("mark");
  (first || body).scrollIntoView({ block: "nearest" });
  $("passage-close").focus();
}
$("passage-close").addEventListener("click", () => { $("passage").hidden = true; });

function renderAnswer(target, answer) {
  // The checked answer: its [n] markers become links to the passage that supports them.
  target.replaceChildren();
  const parts = answer.answer.split(/(\[\d+\])/);
  for (const part of parts) {
    const match = /^\[(\d+)\]$/.exec(part);
    if (match) {
      const number = Number(match[1]);
      const link = document.createElement("a");
      link.href = `#source-${number}`;
      link.className = "citation";
      link.textContent = part;
      link.addEventListener("click", (e) => { e.preventDefault(); openPassage(number); });
      target.append(link);
    } else {
      target.append(part);
    }
  }
}

function figuresLine(answer) {
  const f = answer.figures || {};
  const u = answer.usage || {};
  const tps = f.decode_tps ? ` · ${Number(f.decode_tps).toFixed(1)} tok/s` : "";
  return `retrieval ${Number(f.retrieval_ms || 0).toFixed(0)} ms · prompt ${u.prompt_tokens} tokens` +
    ` · cached ${u.cached_tokens} · first token ${(Number(u.ttft_s) * 1000).toFixed(0)} ms${tps}` +
    ` · ${answer.method}`;
}

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.controller) return;
  showError(null);
  const turn = document.createElement("li");
  const q = document.createElement("p");
  q.className = "question";
  q.textContent = question;
  const answer = document.createElement("p");
  answer.className = "answer";
  answer.setAttribute("aria-live", "polite");
  answer.setAttribute("aria-busy", "true");
  const figures = document.createElement("p");
  figures.className = "figures-line";
  turn.append(q, answer, figures);
  $("thread").append(turn);
  $("question").value = "";
  const body = { question, stream: true };
  if ($("mode").value) body.mode = $("mode").value;
  if (state.conversation) body.conversation = state.conversation;
  state.controller = new AbortController();
  $("stop-button").disabled = false;
  $("ask-button").disabled = true;
  try {
    const response = await api("/v1/ask", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    for await (const { event, data } of sse(response)) {
      if (event === "sources") {
        state.quotes = [];
        renderSources(data.sources);
      } else if (event === "token") {
        answer.append(data.text);
      } else if (event === "done") {
        state.conversation = data.conversation || state.conversation;
        state.quotes = data.quotes || [];
        renderSources(data.sources);
        renderAnswer(answer, data);
        figures.textContent = figuresLine(data);
      } else if (event === "error") {
        throw new ApiError(500, { error: { message: data.message } });
      }
    }
  } catch (error) {
    if (error.name === "AbortError") figures.textContent = "stopped";
    else showError(error);
  } finally {
    answer.removeAttribute("aria-busy");
    state.controller = null;
    $("stop-button").disabled = true;
    $("ask-button").disabled = false;
  }
});

$("stop-button").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new-conversation").addEventListener("click", () => {
  state.conversation = null;
  $("thread").replaceChildren();
  $("sources").replaceChildren();
  $("passage").hidden = true;
  $("question").focus();
});
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("ask-form").requestSubmit(); }
});

// -- documents --------------------------------------------------------------------------------
async function loadDocuments() {
  try {
    const list = await (await api("/v1/documents?limit=1000")).json();
    const body = $("documents-body");
    body.replaceChildren();
    for (const doc of list.documents) {
      const row = document.createElement("tr");
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Delete";
      remove.setAttribute("aria-label", `Delete ${doc.id}`);
      remove.addEventListener("click", () => deleteDocument(doc.id));
      for (const value of [doc.id, String(doc.chunks), doc.ingested_at || ""]) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.append(cell);
      }
      const actions = document.createElement("td");
      actions.append(remove);
      row.append(actions);
      body.append(row);
    }
    $("documents-caption").textContent = `Stored documents (${list.total})`;
  } catch (error) {
    showError(error);
  }
}

async function deleteDocument(id) {
  try {
    const done = await (await api(`/v1/documents/${encodeURIComponent(id)}`, { method: "DELETE" })).json();
    $("upload-result").textContent = `deleted ${done.id}: ${done.chunks_deleted} chunks, ${done.kv_nodes_dropped} cached prefixes dropped`;
    loadDocuments();
    refreshStatus();
  } catch (error) {
    showError(error);
  }
}

$("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showError(null);
  const form = new FormData();
  for (const file of $("files").files) form.append("files", file, file.name);
  // XMLHttpRequest: fetch has no upload progress.
  const request = new XMLHttpRequest();
  request.open("POST", "/v1/documents");
  for (const [name, value] of Object.entries(headers())) request.setRequestHeader(name, value);
  const progress = $("upload-progress");
  progress.hidden = false;
  progress.value = 0;
  request.upload.onprogress = (e) => { if (e.lengthComputable) progress.value = (100 * e.loaded) / e.total; };
  request.onload = () => {
    progress.hidden = true;
    let body = null;
    try { body = JSON.parse(request.responseText); } catch (_) { /* not JSON */ }
    if (request.status === 401) askForToken();
    if (request.status >= 400) { showError(new ApiError(request.status, body)); return; }
    const skipped = (body.skipped || []).map((s) => `${s.path}: ${s.reason}`).join("; ");
    $("upload-result").textContent = `ingested ${body.documents.join(", ")}: ${body.chunks_written} chunks written` +
      (skipped ? ` · skipped ${skipped}` : "");
    $("files").value = "";
    loadDocuments();
    refreshStatus();
  };
  request.onerror = () => { progress.hidden = true; showError(new Error("the upload did not reach the server")); };
  request.send(form);
});

// -- cache ------------------------------------------------------------------------------------
function mib(bytes) { return `${(bytes / 1048576).toFixed(1)} MiB`; }

async function refreshCache() {
  if ($("cache").hidden) return;
  try {
    const figures = await (await api("/v1/cache")).json();
    const s = figures.stats;
    const list = $("cache-figures");
    list.replaceChildren();
    const rows = s ? [
      ["RAM", `${mib(s.ram_bytes)} of ${mib(s.budget_bytes)} (${s.ram_nodes} nodes)`],
      ["Disk", s.disk_enabled ? `${mib(s.disk_bytes)} (${s.disk_nodes} nodes)` : "off"],
      ["Hit rate", s.lookups ? `${((100 * s.hits) / s.lookups).toFixed(1)}% of ${s.lookups} lookups` : "no lookups yet"],
      ["Tokens saved", `${s.hit_tokens} of ${s.prompt_tokens} prompt tokens`],
      ["Evictions", `${s.evictions} (spilled to disk ${s.spills})`],
      ["Worker", `${figures.active} running, ${figures.queue_depth} queued${figures.worker_healthy ? "" : " · restarting"}`],
    ] : [["Cache", "off"]];
    for (const [name, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.figure = name;
      list.append(dt, dd);
    }
    if (s) {
      $("ram-bar").max = Math.max(1, s.budget_bytes);
      $("ram-bar").value = s.ram_bytes;
      state.saved.push(s.hit_tokens);
      if (state.saved.length > 120) state.saved.shift();
      drawSaved();
    }
    const tree = await (await api("/v1/cache/tree?limit=24")).json();
    renderTree(tree.nodes);
  } catch (error) {
    showError(error);
  }
}

function drawSaved() {
  const canvas = $("saved-chart");
  const ctx = canvas.getContext("2d");
  const values = state.saved;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const top = Math.max(1, ...values);
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / Math.max(1, values.length - 1)) * (canvas.width - 4) + 2;
    const y = canvas.height - 4 - (v / top) * (canvas.height - 8);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#333";
  ctx.fillText(`${values[values.length - 1] || 0} tokens`, 6, 14);
}

function renderTree(nodes) {
  const byParent = new Map();
  for (const n of nodes) {
    const key = n.parent === null ? "root" : n.parent;
    if (!byParent.has(key)) byParent.set(key, []);
    byParent.get(key).push(n);
  }
  const build = (key) => {
    const children = byParent.get(key) || [];
    if (!children.length) return null;
    const list = document.createElement("ul");
    for (const n of children.sort((a, b) => b.hits - a.hits)) {
      const item = document.createElement("li");
      const tier = n.in_ram ? "RAM" : n.on_disk ? "disk" : "-";
      item.textContent = `${n.hits} hits · ${n.tokens} tokens @${n.start} · ${tier} · “${n.label}”`;
      const sub = build(n.id);
      if (sub) item.append(sub);
      list.append(item);
    }
    return list;
  };
  const tree = build("root");
  $("cache-tree").replaceChildren(tree || document.createTextNode("nothing cached yet"));
}
setInterval(refreshCache, 2000);

// -- batches ----------------------------------------------------------------------------------
async function loadBatches() {
  try {
    const list = await (await api("/v1/batches")).json();
    const body = $("batches-body");
    body.replaceChildren();
    for (const b of list.data) {
      const row = document.createElement("tr");
      const p = b.progress || {};
      const done = (p.done || 0) + (p.failed || 0);
      const cells = [b.id, b.status, `${done} of ${p.total ?? "?"}`];
      for (const value of cells) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.append(cell);
      }
      const link = document.createElement("button");
      link.type = "button";
      link.textContent = "Download";
      link.addEventListener("click", () => downloadAnswers(b.id));
      const cell = document.createElement("td");
      cell.append(link);
      row.append(cell);
      body.append(row);
    }
    if (!$("batches").hidden && list.data.some((b) => b.status === "running" || b.status === "pending")) {
      setTimeout(loadBatches, 1000);
    }
  } catch (error) {
    showError(error);
  }
}

async function downloadAnswers(id) {
  try {
    const blob = await (await api(`/v1/batches/${id}/output`)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `${id}.jsonl`;
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (error) {
    showError(error);
  }
}

$("batch-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError(null);
  const form = new FormData();
  form.append("file", $("batch-file").files[0]);
  try {
    await api("/v1/batches", { method: "POST", body: form });
    $("batch-file").value = "";
    loadBatches();
  } catch (error) {
    showError(error);
  }
});

refreshStatus();
