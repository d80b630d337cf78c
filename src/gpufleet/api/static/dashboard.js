// The gpufleet dashboard: polls the API every two seconds with the session cookie. Every value from the server is
// put on the page as text (textContent), never as markup.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
let selected = null; // the task shown in the task view
let timer = null;

async function call(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (method !== "GET") headers["X-Gpufleet-Csrf"] = "1"; // a change needs it: another site cannot send it
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) { showLogin(); throw new Error("unauthorized"); }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error(data && data.error ? `${data.error.code}: ${data.error.message}` : response.statusText);
  return data;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function age(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// Unix seconds (overview) or ISO 8601 (task views).
function when(ts) { return ts ? new Date(typeof ts === "number" ? ts * 1000 : ts).toLocaleTimeString() : ""; }

function percent(p) { return p === null || p === undefined ? "" : `${Math.round(p * 100)} %`; }

function taskLink(id) {
  const b = el("button", id, "link");
  b.type = "button";
  b.dataset.task = id;
  b.addEventListener("click", () => { selected = id; refreshTask(); });
  return b;
}

function rows(tbody, items, cells) {
  tbody.replaceChildren(...items.map((item) => {
    const tr = el("tr");
    for (const cell of cells(item)) tr.append(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }));
}

function td(child, cls) { const cell = el("td", undefined, cls); cell.append(child); return cell; }

function renderGpus(gpus) {
  $("gpus").replaceChildren(...gpus.map((g) => {
    const live = g.up && !g.stale;
    const state = g.cordoned ? "cordoned" : !live ? "down" : g.task ? "busy" : g.ready ? "idle" : "starting";
    const card = el("div", undefined, `card ${state}`);
    card.dataset.worker = g.worker;
    card.append(el("div", g.worker, "name"), el("div", `${g.model} · ${state}`, "muted"));
    if (g.memory_total_mb) card.append(el("div", `${g.memory_used_mb ?? "?"} / ${g.memory_total_mb} MB · ${g.utilization_pct ?? "?"} %`, "muted"));
    if (g.temperature_c != null) card.append(el("div", `${g.temperature_c} °C · ${g.power_w ?? "?"} W`, "muted"));
    if (g.cordoned) card.append(el("div", `cordoned (${g.cordoned.by}): ${g.cordoned.reason}`, "warn"));
    for (const warning of (g.health && g.health.warnings) || []) card.append(el("div", warning, "warn"));
    // Each task it holds, a batch's events each, with its own progress.
    for (const task of g.tasks || (g.task ? [g.task] : [])) {
      const line = el("div");
      line.append(taskLink(task.id), el("span", ` ${task.function} ${percent(task.progress)} ${task.progress_message || ""}`));
      const bar = el("div", undefined, "bar");
      const fill = el("div");
      fill.style.width = `${Math.round((task.progress || 0) * 100)}%`;
      bar.append(fill);
      card.append(line, bar);
    }
    return card;
  }));
}

function renderChart(minutes) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const max = Math.max(1, ...minutes.map((m) => m.succeeded + m.failed));
  const width = 600 / Math.max(1, minutes.length);
  const bars = [];
  minutes.forEach((m, i) => {
    const okHeight = (m.succeeded / max) * 116, badHeight = (m.failed / max) * 116;
    for (const [cls, height, y] of [["ok", okHeight, 120 - okHeight], ["bad", badHeight, 120 - okHeight - badHeight]]) {
      if (height <= 0) continue;
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", String(i * width + 1));
      rect.setAttribute("y", String(y));
      rect.setAttribute("width", String(Math.max(1, width - 2)));
      rect.setAttribute("height", String(height));
      rect.setAttribute("class", cls);
      const title = document.createElementNS(ns, "title");
      title.textContent = `${when(m.minute)}: ${m.succeeded} succeeded, ${m.failed} failed`;
      rect.append(title);
      bars.push(rect);
    }
  });
  svg.replaceChildren(...bars);
  const ok = minutes.reduce((n, m) => n + m.succeeded, 0), bad = minutes.reduce((n, m) => n + m.failed, 0);
  $("totals").textContent = `${ok} succeeded, ${bad} failed`;
}

// A job's shards: how many are done, and one row per shard.
function renderShards(shards) {
  $("task-shards").hidden = !shards;
  if (!shards) return;
  const counts = Object.entries(shards.counts).map(([state, n]) => `${n} ${state}`).join(", ");
  $("shards-summary").textContent = `${shards.done}/${shards.total} shards done: ${counts}`;
  $("shards-bar").style.width = `${Math.round(shards.progress * 100)}%`;
  rows($("shards").tBodies[0], shards.items, (s) => [
    s.index, el("td", s.state || "GONE", `state-${s.state}`), s.attempts, s.worker || "",
    td(el("span", s.error ? `${s.error.errorType}: ${s.error.errorMessage}` : (s.outputs || []).join(", ")), "wrap"),
  ]);
}

async function refreshTask() {
  if (!selected) { $("task").hidden = true; return; }
  const view = await call("GET", `/v1/tasks/${encodeURIComponent(selected)}`);
  $("task").hidden = false;
  $("task-id").textContent = view.id;
  $("task-view").textContent = JSON.stringify(view, null, 2);
  $("task").dataset.state = view.state;
  renderShards(view.shards);
  $("cancel").disabled = !["QUEUED", "RUNNING"].includes(view.state);
  $("retry").disabled = !["FAILED", "TIMED_OUT", "CANCELLED", "EXPIRED"].includes(view.state);
}

async function refresh() {
  const [overview, tasks] = await Promise.all([call("GET", "/v1/overview"), call("GET", "/v1/tasks?limit=20")]);
  renderGpus(overview.gpus);
  rows($("queues").tBodies[0], overview.queues, (q) => [q.name, q.depth, q.depth ? age(q.oldest_age_s) : "", q.running]);
  renderChart(overview.per_minute);
  rows($("tasks").tBodies[0], tasks.items, (t) => [
    td(taskLink(t.id)), t.function, el("td", t.state, `state-${t.state}`), percent(t.progress.fraction),
    `${t.attempts}/${t.max_attempts}`, t.worker || "", when(t.created_at),
  ]);
  rows($("dead").tBodies[0], overview.dead_letters, (d) => [when(d.at), d.trigger, d.reason, td(el("span", d.source), "wrap"), td(el("span", d.detail), "wrap")]);
  $("dead-total").textContent = `${overview.dead_letters_total} in all`;
  await refreshTask();
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function loop() {
  clearTimeout(timer);
  try { await refresh(); } catch (error) {
    if (error.message === "unauthorized") return;
    $("updated").textContent = `update failed: ${error.message}`;
  }
  timer = setTimeout(loop, POLL_MS);
}

function showLogin() {
  clearTimeout(timer);
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
}

function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  loop();
}

async function act(action) {
  const id = selected;
  try {
    const out = await call("POST", `/v1/tasks/${encodeURIComponent(id)}/${action}`);
    $("action-result").textContent = `${action}: ${out.outcome}`;
  } catch (error) {
    $("action-result").textContent = `${action} failed: ${error.message}`;
  }
  loop();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const response = await fetch("/dashboard/login", {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("token").value }),
    });
    $("token").value = "";
    if (response.status === 204) { $("login-error").textContent = ""; showApp(); }
    else $("login-error").textContent = "That is not the fleet's token.";
  });
  $("logout").addEventListener("click", async () => {
    await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin" });
    showLogin();
  });
  $("cancel").addEventListener("click", () => act("cancel"));
  $("retry").addEventListener("click", () => act("retry"));
  $("close").addEventListener("click", () => { selected = null; $("task").hidden = true; });
  call("GET", "/v1/overview").then(showApp, () => {});
});
