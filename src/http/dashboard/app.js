// Floodgate dashboard: polls the admin API every 2.5 s with the bearer token kept in
// sessionStorage, computes rates from successive samples, and draws sparklines as inline
// SVG. Everything the API returns is inserted as text, never as HTML: campaign names come
// from whoever submits mail.
"use strict";

const REFRESH_MS = 2500;
/** Samples kept for the sparklines and rates. */
const HISTORY_MS = 5 * 60 * 1000;
/** Rates are measured over this much history, so one slow poll does not make them jump. */
const RATE_WINDOW_MS = 10 * 1000;
/** The queue's per-domain summary is a heavier query; fetch it every few refreshes. */
const QUEUE_EVERY = 4;
const MAX_ROWS = 50;
const TOKEN_KEY = "floodgate.admin-token";
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timer = null;
let tick = 0;
/** {t, accepted, delivered, failed, refused, campaigns: Map(name -> failed)} */
let samples = [];
const rows = new Map();

class ApiError extends Error {
  constructor(kind, status, message) {
    super(message);
    this.kind = kind;
    this.status = status;
  }
}

async function api(method, path, body, withToken) {
  const headers = { Authorization: "Bearer " + (withToken ?? token) };
  const options = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new ApiError("unreachable", 0, "cannot reach the admin API — is floodgate running?");
  }
  if (response.status === 401) {
    throw new ApiError("unauthorized", 401, "the admin token was refused (401)");
  }
  const text = await response.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const why = (data && data.error) || text || response.statusText;
    throw new ApiError("api", response.status, `${method} ${path}: ${response.status} ${why}`);
  }
  return data;
}

// ---- login ------------------------------------------------------------------------

function showLogin(message) {
  stop();
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("login-panel").hidden = false;
  setConn("idle", "not connected");
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("token").focus();
}

function showDashboard() {
  $("login-panel").hidden = true;
  $("login-error").hidden = true;
  $("dashboard").hidden = false;
  $("logout").hidden = false;
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const given = $("token").value.trim();
  $("login-submit").disabled = true;
  try {
    // Check the token before keeping it, so a typo is reported here and not as a broken page.
    await api("GET", "/admin/v1/status", undefined, given);
    token = given;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    start();
  } catch (e) {
    const message = e.kind === "unauthorized"
      ? "Wrong token: the admin token was refused (401). Check [admin] token in floodgate.toml."
      : e.message;
    showLogin(message);
  } finally {
    $("login-submit").disabled = false;
  }
});

$("logout").addEventListener("click", () => {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin("");
});

// ---- polling ----------------------------------------------------------------------

function start() {
  showDashboard();
  stop();
  refresh();
}

function stop() {
  if (timer) clearTimeout(timer);
  timer = null;
}

let inflight = null;

/** One poll at a time: a click's refresh joins the poll under way instead of racing it. */
function refresh() {
  if (!inflight) inflight = poll().finally(() => (inflight = null));
  return inflight;
}

async function poll() {
  try {
    const wantQueue = tick % QUEUE_EVERY === 0;
    const [status, campaigns, alerts, queue, webhooks, batches] = await Promise.all([
      api("GET", "/admin/v1/status"),
      api("GET", "/admin/v1/campaigns"),
      api("GET", "/admin/v1/alerts"),
      wantQueue ? api("GET", "/admin/v1/queue") : Promise.resolve(null),
      api("GET", "/admin/v1/webhooks"),
      api("GET", "/admin/v1/batches"),
    ]);
    tick += 1;
    record(status, campaigns);
    render(status, campaigns, alerts, queue);
    renderWebhooks((webhooks && webhooks.endpoints) || []);
    renderBatches(batches || []);
    setConn("live", "live");
    $("updated").textContent = "updated " + clock(Date.now());
  } catch (e) {
    if (e.kind === "unauthorized") {
      token = "";
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("The admin token was refused (401) — it may have changed. Log in again.");
      return;
    }
    setConn("error", e.kind === "unreachable" ? "unreachable" : "error");
    banner(e.message, "poll");
  }
  stop();
  if (token) timer = setTimeout(refresh, REFRESH_MS);
}

function record(status, campaigns) {
  const now = Date.now();
  const perCampaign = new Map();
  for (const c of campaigns) perCampaign.set(c.name, c.failed);
  samples.push({
    t: now,
    accepted: status.accepted_total ?? 0,
    delivered: status.delivered_total ?? 0,
    // `failed`: failures that are the campaign's doing; `refused`: all others (temporary).
    failed: status.failed_total ?? 0,
    refused: (status.failures_total ?? 0) - (status.failed_total ?? 0),
    campaigns: perCampaign,
  });
  while (samples.length > 2 && samples[0].t < now - HISTORY_MS) samples.shift();
}

/** Per-second rate of `pick` over the last RATE_WINDOW_MS, or null with one sample. */
function rate(pick) {
  if (samples.length < 2) return null;
  const last = samples[samples.length - 1];
  let first = samples[samples.length - 2];
  for (let i = samples.length - 2; i >= 0 && samples[i].t >= last.t - RATE_WINDOW_MS; i--) {
    first = samples[i];
  }
  const dt = (last.t - first.t) / 1000;
  if (dt <= 0) return null;
  return Math.max(0, (pick(last) - pick(first)) / dt);
}

/** Per-second rates between successive samples, for a sparkline. */
function series(pick) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = (samples[i].t - samples[i - 1].t) / 1000;
    const a = pick(samples[i - 1]);
    const b = pick(samples[i]);
    out.push(dt > 0 && a != null && b != null ? Math.max(0, (b - a) / dt) : 0);
  }
  return out;
}

// ---- rendering --------------------------------------------------------------------

function render(status, campaigns, alerts, queue) {
  // A poll that works clears the poll's own error; the outcome of a click stays.
  if ($("banner").dataset.kind === "poll") banner("", "");
  renderIntake(status);
  for (const [key, pick] of [
    ["accepted", (s) => s.accepted],
    ["delivered", (s) => s.delivered],
    ["failures", (s) => s.failed],
  ]) {
    const r = rate(pick);
    $("rate-" + key).textContent = r == null ? "–" : fmtRate(r);
    sparkline($("spark-" + key), series(pick));
  }
  const temporary = rate((s) => s.refused);
  $("rate-temporary").textContent = temporary == null ? "–" : fmtRate(temporary);
  renderCampaigns(campaigns);
  renderPaused(campaigns);
  renderFailLog(status.faillog);
  renderCanary(status.canary || []);
  renderCluster(status.cluster);
  renderQueueStates(status.queue || {});
  if (queue) {
    renderDomains(queue.by_domain || []);
    $("queue-asof").textContent = "at " + clock(Date.now());
  }
  renderAlerts(alerts || []);
}

function renderIntake(status) {
  const el = $("intake-state");
  const paused = !!status.intake_paused;
  el.dataset.state = paused ? "paused" : "active";
  el.textContent = paused ? "PAUSED — new mail gets 451" : "ACCEPTING";
  $("intake-pause").disabled = paused;
  $("intake-resume").disabled = !paused;
}

function renderCampaigns(campaigns) {
  const body = $("campaign-rows");
  const shown = campaigns.slice(0, MAX_ROWS);
  const keep = new Set(shown.map((c) => c.name));
  for (const [name, row] of rows) {
    if (!keep.has(name)) {
      row.remove();
      rows.delete(name);
    }
  }
  for (const c of shown) {
    let row = rows.get(c.name);
    if (!row) {
      row = campaignRow(c.name);
      rows.set(c.name, row);
    }
    updateRow(row, c);
    // appendChild moves an existing row, so this also keeps the worst-first order.
    body.appendChild(row);
  }
  $("campaigns-empty").hidden = campaigns.length > 0;
  const more = $("campaigns-more");
  more.hidden = campaigns.length <= MAX_ROWS;
  more.textContent = `${campaigns.length - MAX_ROWS} more campaigns with fewer failures (floodgate ctl campaigns lists them all).`;
}

function campaignRow(name) {
  const row = document.createElement("tr");
  row.dataset.campaign = name;
  const cells = {};
  for (const field of ["name", "state", "accepted", "failed", "ratio", "trend", "reasons", "actions"]) {
    const td = document.createElement("td");
    td.dataset.field = field;
    if (field === "accepted" || field === "failed") td.className = "num";
    row.appendChild(td);
    cells[field] = td;
  }
  cells.name.textContent = name;
  cells.name.title = name;
  const state = document.createElement("span");
  state.className = "state";
  cells.state.appendChild(state);
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  fill.className = "fill";
  bar.appendChild(fill);
  const pct = document.createElement("span");
  pct.className = "pct";
  cells.ratio.append(bar, pct);
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "spark bad");
  svg.setAttribute("viewBox", "0 0 120 28");
  svg.setAttribute("preserveAspectRatio", "none");
  const now = document.createElement("span");
  now.className = "now";
  cells.trend.append(svg, now);
  for (const [action, label, cls] of [
    ["pause", "Pause", "warn"],
    ["resume", "Resume", ""],
    ["purge", "Purge…", "danger"],
  ]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.className = cls;
    b.dataset.action = action;
    b.dataset.campaign = name;
    cells.actions.appendChild(b);
  }
  return row;
}

function updateRow(row, c) {
  const cell = (f) => row.querySelector(`td[data-field="${f}"]`);
  row.dataset.state = c.state;
  row.classList.toggle("failing", c.failed > 0 && c.failure_ratio >= 0.5);
  const state = cell("state").firstChild;
  state.dataset.state = c.state;
  state.textContent = c.state === "blocked"
    ? "BLOCKED until " + clock(c.blocked_until_ms)
    : c.state.toUpperCase();
  cell("accepted").textContent = fmt(c.accepted);
  cell("failed").textContent = fmt(c.failed);
  const ratio = cell("ratio");
  ratio.dataset.ratio = c.failure_ratio.toFixed(4);
  const fill = ratio.querySelector(".fill");
  fill.style.width = (c.failure_ratio * 100).toFixed(1) + "%";
  fill.dataset.level = level(c.failure_ratio, c.failed);
  ratio.querySelector(".pct").textContent = (c.failure_ratio * 100).toFixed(1) + " %";
  const trend = series((s) => s.campaigns.get(c.name));
  const svg = cell("trend").firstChild;
  sparkline(svg, trend);
  const recent = rate((s) => s.campaigns.get(c.name) ?? 0);
  cell("trend").lastChild.textContent = recent == null ? "" : fmtRate(recent) + "/s";
  cell("reasons").textContent = Object.entries(c.reasons || {})
    .sort((a, b) => b[1] - a[1])
    .slice(0, 3)
    .map(([reason, n]) => `${reason} ${fmt(n)}`)
    .join(" · ") || "—";
  // Bounce classes of failed and deferred deliveries: why the destinations refused.
  const classes = Object.entries(c.classes || {})
    .sort((a, b) => b[1] - a[1])
    .slice(0, 2)
    .map(([klass, n]) => `${klass} ${fmt(n)}`)
    .join(" · ");
  cell("reasons").title = classes ? "bounce classes: " + classes : "";
  if (classes) cell("reasons").textContent += " (" + classes + ")";
  row.querySelector('button[data-action="pause"]').disabled = c.state === "paused";
  row.querySelector('button[data-action="resume"]').disabled = c.state === "active";
}

function level(ratio, failed) {
  if (failed === 0 || ratio < 0.05) return "ok";
  return ratio < 0.5 ? "warn" : "bad";
}

function renderPaused(campaigns) {
  const list = $("paused");
  list.replaceChildren();
  const held = campaigns.filter((c) => c.state !== "active");
  for (const c of held) {
    const li = document.createElement("li");
    li.dataset.campaign = c.name;
    const state = document.createElement("span");
    state.className = "state";
    state.dataset.state = c.state;
    state.textContent = c.state.toUpperCase();
    li.append(state, " " + c.name);
    list.appendChild(li);
  }
  $("paused-empty").hidden = held.length > 0;
}

function renderWebhooks(endpoints) {
  const list = $("webhooks-disabled");
  list.replaceChildren();
  const disabled = endpoints.filter((e) => e.disabled);
  for (const e of disabled) {
    const li = document.createElement("li");
    const state = document.createElement("span");
    state.className = "state";
    state.dataset.state = "paused";
    state.textContent = "DISABLED";
    li.append(state, " " + e.url);
    list.appendChild(li);
  }
  $("webhooks-disabled-empty").hidden = disabled.length > 0;
}

function renderCluster(cluster) {
  $("cluster-panel").hidden = !cluster;
  if (!cluster) return;
  const link = cluster.connected ? "connected" : `DISCONNECTED, rates divided by ${cluster.fallback_divisor}`;
  $("cluster-summary").textContent =
    `— seen from ${cluster.node}, ${link}; ${cluster.accepted_per_sec.toFixed(1)} accepted/s, ` +
    `${cluster.delivered_per_sec.toFixed(1)} delivered/s, ${cluster.queued} queued`;
  const rows = $("cluster-rows");
  rows.replaceChildren();
  for (const n of cluster.nodes) {
    const tr = document.createElement("tr");
    const state = document.createElement("span");
    state.className = "state";
    state.dataset.state = n.alive ? "active" : "blocked";
    state.textContent = n.alive ? "LIVE" : "GONE";
    const cells = [n.node, state, new Date(n.last_heartbeat_ms).toISOString(),
      n.accepted_per_sec.toFixed(1), n.delivered_per_sec.toFixed(1), String(n.queued)];
    for (const v of cells) {
      const td = document.createElement("td");
      td.append(v);
      tr.appendChild(td);
    }
    rows.appendChild(tr);
  }
}

function renderCanary(probes) {
  const rows = $("canary-rows");
  rows.replaceChildren();
  for (const p of probes) {
    const tr = document.createElement("tr");
    const last = p.stages.length ? p.stages[p.stages.length - 1].after_ms : 0;
    const healthy = p.result === "delivered" && !p.slow;
    const state = document.createElement("span");
    state.className = "state";
    state.dataset.state = healthy ? "active" : p.slow ? "paused" : "blocked";
    state.textContent = p.slow ? "SLOW" : p.result.toUpperCase();
    const cells = [p.address, state, `${last} ms`];
    for (const v of cells) {
      const td = document.createElement("td");
      td.append(v);
      tr.appendChild(td);
    }
    rows.appendChild(tr);
  }
  $("canary-empty").hidden = probes.length > 0;
}

function renderBatches(batches) {
  const rows = $("batch-rows");
  rows.replaceChildren();
  for (const b of batches) {
    const tr = document.createElement("tr");
    const rejected = Object.values(b.rejected || {}).reduce((a, n) => a + n, 0);
    const cells = [b.id, b.campaign || "", b.state, b.received, b.accepted, rejected, b.delivered, b.failed, b.queued];
    cells.forEach((v, i) => {
      const td = document.createElement("td");
      td.textContent = String(v);
      if (i >= 3) td.className = "num";
      tr.appendChild(td);
    });
    rows.appendChild(tr);
  }
  $("batches-empty").hidden = batches.length > 0;
}

function renderFailLog(faillog) {
  const select = $("faillog-mode");
  if (!faillog || !faillog.settings) {
    select.disabled = true;
    $("faillog-rate").textContent = "not running";
    return;
  }
  // Do not yank the selector out from under an operator who is choosing.
  if (document.activeElement !== select) select.value = faillog.settings.mode;
  select.dataset.mode = faillog.settings.mode;
  $("faillog-rate").textContent = (faillog.rows_per_sec ?? 0).toFixed(1);
  const c = faillog.counters || {};
  $("faillog-dropped").textContent = `${fmt(c.dropped ?? 0)} / ${fmt(c.suppressed ?? 0)}`;
  $("faillog-written").textContent = fmt(c.rows_written ?? 0);
}

function renderQueueStates(byState) {
  const body = $("queue-states");
  body.replaceChildren();
  const entries = Object.entries(byState);
  if (entries.length === 0) entries.push(["empty", 0]);
  for (const [state, n] of entries) body.appendChild(pair(state, fmt(n), "queue-" + state));
}

function renderDomains(byDomain) {
  const body = $("queue-domains");
  body.replaceChildren();
  for (const [domain, n] of byDomain.slice(0, 8)) body.appendChild(pair(domain, fmt(n)));
  if (byDomain.length === 0) body.appendChild(pair("none queued", ""));
}

function pair(label, value, id) {
  const tr = document.createElement("tr");
  if (id) tr.id = id;
  const a = document.createElement("td");
  a.textContent = label;
  const b = document.createElement("td");
  b.className = "num";
  b.textContent = value;
  tr.append(a, b);
  return tr;
}

function renderAlerts(alerts) {
  const list = $("alerts");
  list.replaceChildren();
  const newest = alerts.slice().sort((a, b) => b.at_ms - a.at_ms).slice(0, 20);
  for (const a of newest) {
    const li = document.createElement("li");
    li.dataset.kind = a.kind;
    const when = document.createElement("span");
    when.className = "muted";
    when.textContent = clock(a.at_ms);
    const what = document.createElement("strong");
    what.textContent = a.campaign ? `${a.kind} · ${a.campaign}` : a.kind;
    const action = a.action ? ` → ${a.action}` : "";
    li.append(when, " ", what, " " + a.message + action);
    list.appendChild(li);
  }
  $("alerts-empty").hidden = alerts.length > 0;
}

function sparkline(svg, values) {
  svg.replaceChildren();
  const w = 120;
  const h = 28;
  const max = Math.max(...values, 0);
  const title = document.createElementNS(SVG_NS, "title");
  title.textContent = values.length ? `peak ${fmtRate(max)}/s` : "collecting samples";
  svg.appendChild(title);
  if (values.length < 2) return;
  const step = w / (values.length - 1);
  const y = (v) => (max > 0 ? h - 2 - (v / max) * (h - 4) : h - 2);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${y(v).toFixed(1)}`);
  const area = document.createElementNS(SVG_NS, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", `0,${h} ${points.join(" ")} ${w},${h}`);
  const line = document.createElementNS(SVG_NS, "polyline");
  line.setAttribute("class", "line");
  line.setAttribute("points", points.join(" "));
  svg.append(area, line);
}

// ---- actions ----------------------------------------------------------------------

$("campaign-rows").addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const name = button.dataset.campaign;
  const action = button.dataset.action;
  let body;
  if (action === "purge") {
    const blockFor = $("block-for").value;
    const block = blockFor ? ` and refuse its new mail for ${blockFor}` : "";
    if (!confirm(`Purge campaign "${name}"?\n\nEvery recipient of it still in the queue is removed${block}. This cannot be undone.`)) return;
    body = blockFor ? { block_for: blockFor } : {};
  }
  const path = `/admin/v1/campaigns/${encodeURIComponent(name)}/${action}`;
  await act(button, () => api("POST", path, body), (r) => {
    const purged = r && r.purged != null ? `, ${fmt(r.purged)} queued recipients removed` : "";
    return `campaign ${name}: ${action}d${purged}`;
  });
});

for (const [id, action] of [["intake-pause", "pause"], ["intake-resume", "resume"]]) {
  $(id).addEventListener("click", async (event) => {
    if (action === "pause" && !confirm("Pause intake?\n\nEvery new message, from every campaign, is refused with 451 4.7.1 until you resume.")) return;
    await act(event.currentTarget, () => api("POST", `/admin/v1/intake/${action}`), () => `intake ${action}d`);
  });
}

$("faillog-mode").addEventListener("change", async (event) => {
  const select = event.currentTarget;
  const mode = select.value;
  await act(select, () => api("PUT", "/admin/v1/faillog", { mode }), () => `failure log switched to ${mode}`);
  select.blur();
});

async function act(control, call, describe) {
  control.disabled = true;
  try {
    const result = await call();
    banner(describe(result), "info");
  } catch (e) {
    if (e.kind === "unauthorized") return showLogin("The admin token was refused (401). Log in again.");
    banner(e.message, "error");
  } finally {
    control.disabled = false;
  }
  // A poll under way started before the click; show the state after it.
  if (inflight) await inflight;
  await refresh();
}

// ---- helpers ----------------------------------------------------------------------

function banner(message, kind) {
  const el = $("banner");
  el.hidden = !message;
  el.textContent = message;
  el.dataset.kind = kind;
}

function setConn(state, label) {
  const el = $("conn");
  el.dataset.conn = state;
  el.className = "pill pill-" + state;
  el.textContent = label;
}

function fmt(n) {
  return Number(n).toLocaleString("en-US");
}

function fmtRate(r) {
  return r >= 100 ? fmt(Math.round(r)) : r.toFixed(1);
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
}

if (token) start();
else showLogin("");
