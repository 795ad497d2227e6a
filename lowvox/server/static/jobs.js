// lowvox web page: the Jobs panel (long-form jobs: books). Plain browser JavaScript; it
// uses the helpers of app.js ($, api, fillSelect), which is loaded first.
"use strict";

const TERMINAL = ["done", "failed", "cancelled"];
// Browsers open about six HTTP/1.1 connections per host; each progress stream holds one.
// The server runs one job at a time, so the running job and the next queued one suffice.
const MAX_STREAMS = 2;
const ACTIONS = {
  queued: ["pause", "cancel", "delete"],
  running: ["pause", "cancel", "delete"],
  paused: ["resume", "cancel", "delete"],
  failed: ["resume", "cancel", "delete"],
  done: ["delete"],
  cancelled: ["delete"],
};

const jobs = {
  list: [], // job summaries, newest first, as GET /api/jobs gives them
  selected: null, // the id whose chapters and flagged sentences are shown
  shown: "", // what the details show: id, state, updated, sentences done
  streams: new Map(), // id -> EventSource
  pace: new Map(), // id -> {eta, rtf} of the latest progress event
};

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

function jobSay(text, isError = false) {
  const box = $("job-message");
  box.textContent = text;
  box.classList.toggle("error", isError);
}

function clock(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  const two = (n) => String(n).padStart(2, "0");
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h}:${two(m)}:${two(s % 60)}` : `${m}:${two(s % 60)}`;
}

// -- the form -------------------------------------------------------------------------

// The voice and language lists are the Speak panel's (filled per engine by app.js).
function mirrorSelect(from, to) {
  const copy = () => {
    const items = [...from.options].map((o) => ({ value: o.value, label: o.textContent }));
    const keep = items.some((i) => i.value === to.value) ? to.value : from.value;
    fillSelect(to, items, keep);
  };
  new MutationObserver(copy).observe(from, { childList: true });
  copy();
}

function jobOptions() {
  const fields = {
    engine: $("engine").value,
    title: $("job-title").value.trim(),
    voice: $("job-voice").value,
    language: $("job-language").value,
    format: $("job-format").value,
    chapters: $("job-chapters").value.trim(),
  };
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v));
}

async function createJob(event) {
  event.preventDefault();
  const file = $("job-file").files[0];
  const options = jobOptions();
  let init;
  if (file) {
    const form = new FormData();
    form.append("file", file);
    for (const [k, v] of Object.entries(options)) form.append(k, v);
    init = { method: "POST", body: form };
  } else {
    const text = $("job-text").value;
    if (!text.trim()) { jobSay("paste some text or choose a file", true); return; }
    init = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...options, text, markdown: $("job-markdown").checked }),
    };
  }
  const submit = $("job-form").querySelector("button[type=submit]");
  submit.disabled = true;
  jobSay("starting the job…");
  try {
    const { job } = await (await api("/api/jobs", init)).json();
    jobSay(`job started: ${job.title} (${job.progress.total} sentences)`);
    $("job-text").value = "";
    $("job-file").value = "";
    $("job-title").value = "";
    jobs.selected = job.id;
    await loadJobs();
  } catch (e) {
    jobSay(e.message, true);
  } finally {
    submit.disabled = false;
  }
}

// -- the list -------------------------------------------------------------------------

async function loadJobs() {
  try {
    jobs.list = (await (await api("/api/jobs")).json()).jobs;
  } catch (e) {
    jobSay(e.message, true);
    return;
  }
  $("job-list").replaceChildren(...jobs.list.map(jobRow));
  followProgress();
  const selected = jobs.list.find((j) => j.id === jobs.selected);
  if (!selected) jobs.selected = null;
  // Redraw the details only when they changed: a redraw resets the chapter players.
  const seen = selected ? `${selected.id} ${selected.state} ${selected.updated} ${selected.progress.done}` : "";
  if (seen !== jobs.shown) await loadDetail();
}

function jobRow(job) {
  const p = job.progress;
  let stats = `${p.done}/${p.total} sentences · ${clock(p.audio_seconds)} audio`;
  const pace = jobs.pace.get(job.id);
  if (job.state === "running" && pace) {
    stats += ` · ETA ${clock(pace.eta)}`;
    if (pace.rtf !== null && pace.rtf !== undefined) stats += ` · RTF ${pace.rtf.toFixed(2)}`;
  }
  if (p.flagged) stats += ` · ${p.flagged} flagged`;
  if (p.failed) stats += ` · ${p.failed} failed`;
  const buttons = (ACTIONS[job.state] || ["delete"]).map((action) =>
    el("button", {
      className: `secondary job-${action}`,
      textContent: action[0].toUpperCase() + action.slice(1),
      onclick: () => jobAction(job, action),
    }));
  const li = el("li", { className: "job" + (job.id === jobs.selected ? " selected" : "") },
    el("div", { className: "row" },
      el("button", { className: "link job-title", textContent: job.title, onclick: () => select(job.id) }),
      el("span", { className: `job-state state-${job.state}`, textContent: job.state })),
    el("progress", { max: 1, value: p.fraction }),
    el("div", { className: "job-stats", textContent: stats }),
    job.error ? el("div", { className: "message error", textContent: job.error }) : null,
    el("div", { className: "row" }, ...buttons));
  li.setAttribute("data-id", job.id);
  li.setAttribute("data-state", job.state);
  return li;
}

function redrawRow(job) {
  const old = $("job-list").querySelector(`li[data-id="${job.id}"]`);
  if (old) old.replaceWith(jobRow(job));
}

async function jobAction(job, action) {
  if (action === "delete" && !confirm(`Delete the job "${job.title}" and its audio?`)) return;
  const path = `/api/jobs/${job.id}`;
  try {
    if (action === "delete") await api(path, { method: "DELETE" });
    else await api(`${path}/${action}`, { method: "POST" });
    jobSay("");
  } catch (e) {
    jobSay(e.message, true);
  }
  await loadJobs();
}

// -- progress (Server-Sent Events) ------------------------------------------------------

function followProgress() {
  const active = [
    ...jobs.list.filter((j) => j.state === "running"),
    ...jobs.list.filter((j) => j.state === "queued").reverse(), // the oldest runs next
  ].slice(0, MAX_STREAMS).map((j) => j.id);
  for (const [id, source] of jobs.streams) {
    if (!active.includes(id)) { source.close(); jobs.streams.delete(id); }
  }
  for (const id of active) {
    if (jobs.streams.has(id)) continue;
    // EventSource cannot send headers: with a key, the page's session cookie goes along.
    const source = new EventSource(`/api/jobs/${id}/events`);
    source.addEventListener("progress", (event) => onProgress(id, JSON.parse(event.data)));
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) jobs.streams.delete(id);
    };
    jobs.streams.set(id, source);
  }
}

function stopFollowing() {
  for (const source of jobs.streams.values()) source.close();
  jobs.streams.clear();
}

function onProgress(id, data) {
  const job = jobs.list.find((j) => j.id === id);
  if (!job) return;
  const before = job.state;
  if (data.progress) {
    Object.assign(job, data); // the first event: a snapshot of the job
  } else {
    const { total, done, failed, flagged, audio_seconds: audio } = data;
    job.state = data.state;
    job.error = data.error || null;
    job.progress = { total, done, failed, flagged, audio_seconds: audio, fraction: total ? done / total : 0 };
    jobs.pace.set(id, { eta: data.eta, rtf: data.rtf });
  }
  if (TERMINAL.includes(job.state)) {
    // The server ends the stream here; close it before EventSource reconnects.
    const source = jobs.streams.get(id);
    if (source) { source.close(); jobs.streams.delete(id); }
    loadJobs(); // the finished job has downloads now, and the next one may start
    return;
  }
  redrawRow(job);
  if (job.state !== before && id === jobs.selected) loadDetail();
}

// -- the selected job ------------------------------------------------------------------

function select(id) {
  jobs.selected = id;
  for (const li of $("job-list").children) li.classList.toggle("selected", li.getAttribute("data-id") === id);
  loadDetail();
}

async function loadDetail() {
  const box = $("job-detail");
  const id = jobs.selected;
  if (!id) { box.classList.add("hidden"); box.replaceChildren(); jobs.shown = ""; return; }
  let job;
  try {
    job = (await (await api(`/api/jobs/${id}`)).json()).job;
  } catch (e) {
    jobSay(e.message, true);
    return;
  }
  if (jobs.selected !== id) return; // another job was picked meanwhile
  jobs.shown = `${job.id} ${job.state} ${job.updated} ${job.progress.done}`;
  const downloads = job.downloads
    ? el("div", { className: "row" }, "Download:",
      ...[["book", `book (.${job.format})`], ["srt", "SRT"], ["vtt", "VTT"]].map(([part, label]) =>
        el("a", { className: `download download-${part}`, href: job.downloads[part], download: "", textContent: label })))
    : null;
  const chapters = job.chapters.map((c) =>
    el("li", {},
      el("span", { textContent: c.title || `Chapter ${c.index}` }),
      el("span", { className: "muted", textContent: ` — ${c.done}/${c.sentences} sentences · ${clock(c.audio_seconds)}` }),
      c.url ? el("audio", { className: "chapter-audio", controls: true, preload: "metadata", src: c.url }) : null));
  box.replaceChildren(
    el("h3", { textContent: job.title + (job.author ? ` — ${job.author}` : "") }),
    downloads,
    el("h4", { textContent: "Chapters" }),
    el("ol", { id: "job-chapters-list" }, ...chapters),
    el("h4", { textContent: `Flagged sentences (${job.flagged.length})` }),
    el("ul", { id: "job-flagged" }, ...job.flagged.map((s) => flaggedRow(job, s))));
  box.classList.remove("hidden");
}

function flaggedRow(job, s) {
  const notes = [`chapter ${s.chapter}`, ...s.flags, s.state, `take ${s.attempt + 1}`];
  if (s.voice) notes.push(`voice ${s.voice}`);
  if (s.error) notes.push(s.error);
  const editor = el("textarea", { rows: 2, value: s.text });
  const editRow = el("div", { className: "edit hidden" },
    editor,
    el("div", { className: "row" },
      el("button", { className: "save", textContent: "Retake with this text", onclick: () => retake(job, s, editor.value) }),
      el("button", { className: "secondary", textContent: "Cancel", onclick: () => editRow.classList.add("hidden") })));
  const li = el("li", {},
    el("div", { className: "text", textContent: s.text }),
    el("div", { className: "muted", textContent: notes.join(" · ") }),
    el("div", { className: "row" },
      el("button", {
        className: "secondary play", textContent: "Play", disabled: !s.audio_url,
        onclick: () => playSentence(s.audio_url),
      }),
      el("button", { className: "secondary retake", textContent: "Retake", onclick: () => retake(job, s) }),
      el("button", { className: "secondary edit", textContent: "Edit", onclick: () => editRow.classList.toggle("hidden") })),
    editRow);
  li.setAttribute("data-index", s.index);
  return li;
}

function playSentence(url) {
  const player = $("job-player");
  player.src = url;
  player.classList.remove("hidden");
  player.play().catch(() => { /* autoplay may be blocked; the controls remain */ });
}

async function retake(job, s, text) {
  const init = { method: "POST" };
  if (text !== undefined) {
    if (!text.trim()) { jobSay("the new text is empty", true); return; }
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify({ text });
  }
  try {
    await api(`/api/jobs/${job.id}/sentences/${s.index}/retake`, init);
    jobSay(`sentence ${s.index + 1} is spoken again; the book follows`);
  } catch (e) {
    jobSay(e.message, true);
  }
  await loadJobs();
}

// -- start ----------------------------------------------------------------------------

function startJobs() {
  mirrorSelect($("voice"), $("job-voice"));
  mirrorSelect($("language"), $("job-language"));
  $("job-form").onsubmit = createJob;
  // app.js stores a new key on change; the streams' URLs carry the old one.
  $("api-key").addEventListener("change", () => { stopFollowing(); jobSay(""); loadJobs(); });
  loadJobs();
}

startJobs();
