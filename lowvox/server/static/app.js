// lowvox web page: plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
// `generation`: the AbortController of this page's generate request, while it runs;
// `streamHint`: the name the playing stream's kept copy starts with.
const state = { engine: null, audioUrl: null, generation: null, streamHint: null };

function apiKey() {
  return localStorage.getItem("lowvox-api-key") || "";
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

// <audio src>, download links and EventSource cannot send headers. Rather than put the key
// in their URLs (and so in logs and history), the page trades it once for an HttpOnly
// session cookie, which the browser then sends with them.
const SESSION_REFRESH_MS = 60 * 60 * 1000;
let sessionTimer = null;

async function openSession() {
  if (!apiKey()) return;
  await api("/api/session", { method: "POST" });
  if (sessionTimer === null) {
    sessionTimer = setInterval(() => openSession().catch(() => { /* next try in an hour */ }), SESSION_REFRESH_MS);
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function say(text, isError = false) {
  const el = $("message");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function fillSelect(select, items, selected) {
  select.innerHTML = "";
  for (const item of items) {
    const option = document.createElement("option");
    option.value = item.value;
    option.textContent = item.label;
    if (item.value === selected) option.selected = true;
    select.appendChild(option);
  }
}

async function loadEngines() {
  const data = await (await api("/api/engines")).json();
  fillSelect($("engine"), data.engines.map((e) => ({ value: e.name, label: e.name })), data.default);
  await loadEngine(data.default);
}

async function loadEngine(name) {
  say(`loading ${name}…`);
  try {
    const info = await (await api(`/api/engines/${encodeURIComponent(name)}`)).json();
    state.engine = info;
    fillSelect($("voice"), info.voices.map((v) => ({ value: v.id, label: v.name })), info.default_voice);
    const langs = info.languages.map((l) => ({ value: l, label: l }));
    fillSelect($("language"), [{ value: "auto", label: "auto" }, ...langs], info.languages.includes("en") ? "en" : "auto");
    say("");
  } catch (e) {
    say(`${name}: ${e.message}`, true);
  }
}

function request() {
  return {
    model: $("engine").value,
    input: $("text").value,
    voice: $("voice").value,
    language: $("language").value,
    response_format: $("format").value,
    speed: parseFloat($("speed").value),
  };
}

function showAudio(url, filename) {
  const player = $("player");
  player.onended = null;
  // <audio> cannot read the server's answer: a refused stream (a 429, a 401, a voice gone)
  // or a file gone from the list would otherwise fail with no word.
  player.onerror = () => say(filename
    ? `cannot play ${filename}: the server refused it or the connection broke`
    : "the stream failed: the server refused it or the connection broke (Generate shows the server's reason)", true);
  state.streamHint = null;
  player.src = url;
  player.play().catch(() => { /* autoplay may be blocked; the controls remain */ });
  offerDownload(url, filename);
}

function offerDownload(url, filename) {
  const link = $("download");
  link.href = url;
  link.download = filename;
  link.classList.remove("hidden");
}

async function generate() {
  const body = { ...request(), save: true };
  const controller = new AbortController();
  state.generation = controller;
  $("generate").disabled = true;
  say("generating…");
  try {
    const response = await api("/v1/audio/speech", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    const blob = await response.blob();
    if (state.audioUrl) URL.revokeObjectURL(state.audioUrl);
    state.audioUrl = URL.createObjectURL(blob);
    showAudio(state.audioUrl, response.headers.get("X-Output-File") || `lowvox.${body.response_format}`);
    say(`done: ${(blob.size / 1024).toFixed(1)} KiB`);
    loadRecent();
  } catch (e) {
    if (e.name === "AbortError") say("stopped"); else say(e.message, true);
  } finally {
    if (state.generation === controller) state.generation = null;
    $("generate").disabled = false;
  }
}

function stream() {
  const r = request();
  if (!r.input.trim()) { say("text is empty", true); return; }
  // The browser plays the WAV/MP3 stream as it arrives; the server also keeps the file,
  // under a name of this stream's own so that the page can offer it once the stream ends
  // (the stream's URL would speak the text again).
  const hint = `web_stream_${Math.random().toString(36).slice(2, 10)}`;
  const params = new URLSearchParams({
    text: r.input, voice: r.voice, language: r.language, engine: r.model,
    speed: String(r.speed), format: r.response_format === "wav" ? "wav" : "mp3",
    output_file: hint,
  });
  showAudio(`/api/tts-generate-streaming?${params}`, "");
  $("download").classList.add("hidden");
  state.streamHint = hint;
  say("streaming…");
  $("player").onended = () => { say("done"); offerKeptStream(hint); };
}

// The kept copy of a stream, from the recent list (published as the stream ends, or soon
// after it was stopped).
async function offerKeptStream(hint) {
  for (let attempt = 0; attempt < 10; attempt++) {
    const kept = (await loadRecent()).find((g) => g.file.startsWith(`${hint}_`));
    if (kept) {
      if (state.streamHint === hint) offerDownload(kept.url, kept.file);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

// Stops this page's own generation (its request, or its stream: a client that leaves
// cancels its job), not everyone's: other clients and long-form jobs go on.
function stop() {
  if (state.generation) state.generation.abort();
  const player = $("player");
  player.pause();
  if (player.src.includes("/api/tts-generate-streaming")) {
    player.onended = null;
    player.onerror = null;
    player.removeAttribute("src");
    player.load(); // ends the stream's download
    say("stopped");
    if (state.streamHint) offerKeptStream(state.streamHint);
  }
}

async function loadVoices() {
  const data = await (await api("/api/library/voices")).json();
  const body = $("voice-table").querySelector("tbody");
  body.innerHTML = "";
  for (const v of data.voices) {
    const row = document.createElement("tr");
    const cells = [v.name, String(v.clips), v.duration.toFixed(1)];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      row.appendChild(td);
    }
    const actions = document.createElement("td");
    const preview = document.createElement("button");
    preview.textContent = "Play";
    preview.className = "secondary";
    preview.onclick = () => showAudio(v.preview_url, `${v.name}.wav`);
    const rename = document.createElement("button");
    rename.textContent = "Rename";
    rename.className = "secondary";
    rename.onclick = async () => {
      const name = prompt("New name", v.name);
      if (!name || name === v.name) return;
      try {
        await api(`/api/library/voices/${encodeURIComponent(v.name)}`, {
          method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }),
        });
        loadVoices();
      } catch (e) { say(e.message, true); }
    };
    const remove = document.createElement("button");
    remove.textContent = "Delete";
    remove.className = "secondary";
    remove.onclick = async () => {
      if (!confirm(`Delete voice ${v.name}?`)) return;
      try {
        await api(`/api/library/voices/${encodeURIComponent(v.name)}`, { method: "DELETE" });
        loadVoices();
      } catch (e) { say(e.message, true); }
    };
    actions.append(preview, rename, remove);
    row.appendChild(actions);
    body.appendChild(row);
  }
}

async function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("voice-name").value);
  for (const file of $("voice-files").files) form.append("files", file);
  say("uploading…");
  try {
    const data = await (await api("/api/library/voices", { method: "POST", body: form })).json();
    say(`voice ${data.voice.name} stored (${data.voice.clips} clip(s))`);
    $("upload-form").reset();
    await loadVoices();
    await loadEngine($("engine").value);
  } catch (e) {
    say(e.message, true);
  }
}

async function loadRuntime() {
  const data = await (await api("/api/runtime")).json();
  $("device").value = data.device;
  fillSelect($("precision"), data.choices.precision.map((p) => ({ value: p, label: p })), data.precision);
  fillSelect($("residency"), data.choices.residency.map((p) => ({ value: p, label: p })), data.residency);
  $("low-vram").checked = data.low_vram;
  $("fast-path").checked = data.fast_path;
}

async function applyRuntime() {
  say("reloading the engine…");
  try {
    await api("/api/runtime", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ device: $("device").value, precision: $("precision").value, residency: $("residency").value }),
    });
    await loadRuntime();
    say("runtime settings applied");
  } catch (e) { say(e.message, true); }
}

async function toggle(path, param, checked) {
  try {
    await api(`${path}?${param}=${checked ? "True" : "False"}`, { method: "POST" });
  } catch (e) { say(e.message, true); }
}

async function loadRecent() {
  const data = await (await api("/api/recent")).json();
  const list = $("recent-list");
  list.innerHTML = "";
  for (const g of data.generations) {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = g.url;
    link.textContent = g.file;
    link.onclick = (event) => { event.preventDefault(); showAudio(g.url, g.file); };
    li.append(link, document.createTextNode(` — ${g.engine}/${g.voice || "default"}: ${g.text}`));
    list.appendChild(li);
  }
  return data.generations;
}

async function start() {
  $("api-key").value = apiKey();
  $("api-key").onchange = async () => {
    localStorage.setItem("lowvox-api-key", $("api-key").value);
    // A cleared key ends the session too.
    if (!apiKey()) await fetch("/api/session", { method: "DELETE" }).catch(() => {});
    start();
  };
  $("speed").addEventListener("input", () => { $("speed-value").textContent = Number($("speed").value).toFixed(2); });
  $("engine").onchange = () => loadEngine($("engine").value);
  $("generate").onclick = generate;
  $("stream").onclick = stream;
  $("stop").onclick = stop;
  $("upload-form").onsubmit = upload;
  $("apply-runtime").onclick = applyRuntime;
  $("low-vram").onchange = () => toggle("/api/lowvramsetting", "new_low_vram_value", $("low-vram").checked);
  $("fast-path").onchange = () => toggle("/api/deepspeed", "new_deepspeed_value", $("fast-path").checked);
  try {
    await openSession();
    const ready = await (await api("/api/ready")).text();
    $("status").textContent = ready === "Ready" ? "ready" : ready;
    await loadEngines();
    await Promise.all([loadVoices(), loadRuntime(), loadRecent()]);
  } catch (e) {
    $("status").textContent = "offline";
    say(e.message, true);
  }
}

start();
