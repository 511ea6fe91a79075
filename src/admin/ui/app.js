// The event inspector: a page over the admin API. Plain JavaScript, no build step, nothing
// fetched from elsewhere. Every value from an event is put in the page as text
// (textContent), never as HTML: bodies hold what callers typed.
"use strict";

const TOKEN_KEY = "kallina-relay-admin-token";
const $ = (id) => document.getElementById(id);
const state = {
  filters: {},
  newestSeq: null,
  olderCursor: null,
  shown: new Set(),
  liveTimer: null,
  overviewTimer: null,
  samples: [],
  current: null,
};

// ---- the admin API ----------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + token() };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    credentials: "omit",
    cache: "no-store",
  });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (response.status === 401) {
    signOut("The token was refused: sign in again.");
    throw new Error("unauthorized");
  }
  if (!response.ok) {
    const message = json && json.error ? json.error.message : response.status + " " + text;
    throw new Error(message);
  }
  return json;
}

async function metricsText() {
  const response = await fetch("/metrics", { cache: "no-store", credentials: "omit" });
  return response.text();
}

/// `name{labels} value` lines into [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)$/);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[3] || "").matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2];
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

// ---- small DOM helpers (text only) ----------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(section) {
  for (const id of ["sign-in", "events", "detail", "redrive", "overview"]) {
    $(id).hidden = id !== section;
  }
  for (const button of document.querySelectorAll("#tabs button[data-tab]")) {
    button.classList.toggle("active", button.dataset.tab === section);
  }
}

function localToIso(value) {
  return value ? new Date(value).toISOString() : "";
}

// ---- sign in ----------------------------------------------------------------------------

async function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  try {
    await api("/admin/events?limit=1");
  } catch (e) {
    if (e.message !== "unauthorized") $("sign-in-error").textContent = e.message;
    return;
  }
  $("sign-in-error").textContent = "";
  $("tabs").hidden = false;
  openEvents();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(state.liveTimer);
  clearInterval(state.overviewTimer);
  $("tabs").hidden = true;
  $("sign-in-error").textContent = message || "";
  show("sign-in");
}

// ---- events list ------------------------------------------------------------------------

function listQuery(extra) {
  const params = new URLSearchParams();
  const f = state.filters;
  for (const key of ["event", "source", "status", "q"]) {
    if (f[key]) params.set(key, f[key]);
  }
  if (f.since) params.set("since", localToIso(f.since));
  if (f.until) params.set("until", localToIso(f.until));
  for (const [k, v] of Object.entries(extra)) params.set(k, v);
  return "/admin/events?" + params.toString();
}

function eventRow(e) {
  const row = el("tr", { "data-id": e.id },
    el("td", {}, e.received),
    el("td", {}, e.event || "?"),
    el("td", { class: "status-" + e.status }, e.status),
    el("td", {}, e.source || ""),
    el("td", { class: "id" }, e.id || ""),
    el("td", { class: "num" }, e.size_bytes),
    el("td", { class: "num" }, e.attempts),
    el("td", { class: "about" }, e.about || ""));
  row.addEventListener("click", () => openDetail(e.id));
  return row;
}

async function loadEvents() {
  const tbody = document.querySelector("#event-table tbody");
  tbody.replaceChildren();
  state.shown.clear();
  state.newestSeq = null;
  state.olderCursor = null;
  const f = state.filters;
  try {
    if (f.id) {
      const detail = await api("/admin/events/" + encodeURIComponent(f.id));
      tbody.append(eventRow(detail));
      $("list-status").textContent = "1 event";
      $("more").hidden = true;
      return;
    }
    if (f.status === "quarantined") {
      const list = await api("/admin/quarantine");
      for (const q of list.events) {
        tbody.append(eventRow({
          id: q.id || "seq " + q.seq, event: q.event, status: "quarantined",
          received: q.quarantined, size_bytes: q.size_bytes, attempts: "", about: q.reason,
        }));
      }
      $("list-status").textContent = list.events.length + " quarantined";
      $("more").hidden = true;
      return;
    }
    const page = await api(listQuery({ order: "desc", limit: 50 }));
    for (const e of page.events) {
      state.shown.add(e.id);
      tbody.append(eventRow(e));
    }
    if (page.events.length) state.newestSeq = page.events[0].seq;
    state.olderCursor = page.next_cursor;
    $("more").hidden = !page.next_cursor;
    $("list-status").textContent = page.events.length
      ? "newest first; " + page.events.length + " shown"
      : "no events match";
  } catch (e) {
    if (e.message !== "unauthorized") $("list-status").textContent = "error: " + e.message;
  }
}

async function loadOlder() {
  if (!state.olderCursor) return;
  const page = await api(listQuery({ order: "desc", limit: 50, cursor: state.olderCursor }));
  const tbody = document.querySelector("#event-table tbody");
  for (const e of page.events) {
    if (state.shown.has(e.id)) continue;
    state.shown.add(e.id);
    tbody.append(eventRow(e));
  }
  state.olderCursor = page.next_cursor;
  $("more").hidden = !page.next_cursor;
}

/// New events since the newest shown, put on top: the cursor is a sequence number, so paging
/// stays right while events arrive.
async function pollNewer() {
  const f = state.filters;
  if ($("events").hidden || !$("live").checked || f.id || f.status === "quarantined") return;
  const extra = { order: "asc", limit: 200 };
  if (state.newestSeq !== null) extra.cursor = state.newestSeq;
  else return loadEvents();
  try {
    const page = await api(listQuery(extra));
    const tbody = document.querySelector("#event-table tbody");
    for (const e of page.events) {
      state.newestSeq = e.seq;
      if (state.shown.has(e.id)) continue;
      state.shown.add(e.id);
      tbody.prepend(eventRow(e));
    }
  } catch (_) { /* shown on the next full load */ }
}

function openEvents() {
  show("events");
  loadEvents();
  clearInterval(state.liveTimer);
  state.liveTimer = setInterval(pollNewer, 2000);
}

// ---- event detail -----------------------------------------------------------------------

/// Pretty-printed JSON with its tokens highlighted, built from text nodes only.
function renderJson(value, indent = "") {
  const frag = document.createDocumentFragment();
  const span = (cls, text) => el("span", { class: cls }, text);
  if (value === null) frag.append(span("z", "null"));
  else if (typeof value === "string") frag.append(span("s", JSON.stringify(value)));
  else if (typeof value === "number") frag.append(span("n", String(value)));
  else if (typeof value === "boolean") frag.append(span("b", String(value)));
  else if (Array.isArray(value)) {
    if (!value.length) { frag.append("[]"); return frag; }
    frag.append("[\n");
    value.forEach((item, i) => {
      frag.append(indent + "  ", renderJson(item, indent + "  "), i < value.length - 1 ? ",\n" : "\n");
    });
    frag.append(indent + "]");
  } else {
    const keys = Object.keys(value);
    if (!keys.length) { frag.append("{}"); return frag; }
    frag.append("{\n");
    keys.forEach((key, i) => {
      frag.append(indent + "  ", span("k", JSON.stringify(key)), ": ",
        renderJson(value[key], indent + "  "), i < keys.length - 1 ? ",\n" : "\n");
    });
    frag.append(indent + "}");
  }
  return frag;
}

function shellQuote(text) {
  return "'" + String(text).replace(/'/g, "'\\''") + "'";
}

async function openDetail(id) {
  show("detail");
  $("redeliver-confirm").hidden = true;
  $("redeliver-result").textContent = "";
  let e;
  try {
    e = await api("/admin/events/" + encodeURIComponent(id));
  } catch (err) {
    $("detail-title").textContent = "error: " + err.message;
    return;
  }
  state.current = e;
  $("detail-title").textContent = e.event + " " + e.id;
  const summary = $("detail-summary");
  summary.replaceChildren();
  for (const [k, v] of [["id", e.id], ["type", e.event], ["source", e.source], ["status", e.status],
    ["size", e.size_bytes + " bytes"], ["attempts", e.attempts], ["about", e.about || "–"]]) {
    summary.append(el("dt", {}, k), el("dd", {}, v));
  }
  const timeline = $("timeline");
  timeline.replaceChildren();
  for (const step of e.timeline || []) {
    timeline.append(el("li", {}, step.at + "  " + step.what));
  }
  $("body").replaceChildren(renderJson(e.body));
  $("publish").textContent = JSON.stringify(e.publish, null, 2);
  $("signature").textContent = e.signature || "(none kept)";
  const path = e.source && e.source_path ? e.source_path : "/webhooks/kallina";
  $("reproduce").textContent = [
    "# the body, as stored",
    "kallina-relay events show " + shellQuote(e.id) + " --json | jq '.body' > event.json",
    "# post it to a relay on this host, signed and with a fresh timestamp",
    "kallina-relay replay event.json --fresh-timestamp" +
      (e.source_path && e.source_path !== "/webhooks/kallina" ? " --source " + shellQuote(e.source) : ""),
    "# or with curl (the timestamp must still be inside the tolerance)",
    "curl -sS -X POST http://127.0.0.1:8080" + path +
      " -H 'Content-Type: application/json' -H \"X-Kallina-Signature: $(kallina-relay sign event.json)\"" +
      " --data-binary @event.json",
  ].join("\n");
  $("redeliver").hidden = e.status !== "published";
}

async function redeliver() {
  const e = state.current;
  $("redeliver-confirm").hidden = true;
  try {
    const answer = await api("/admin/events/" + encodeURIComponent(e.id) + "/redeliver", { method: "POST" });
    $("redeliver-result").textContent = "Put back in the outbox (" + answer.status + "): it will be published again.";
  } catch (err) {
    $("redeliver-result").textContent = "Not redelivered: " + err.message;
  }
}

// ---- redrive ----------------------------------------------------------------------------

function redriveBody(dryRun) {
  const form = new FormData($("redrive-form"));
  const body = {
    since: localToIso(form.get("since")),
    until: localToIso(form.get("until")),
    dry_run: dryRun,
  };
  if (form.get("event")) body.event = form.get("event");
  if (form.get("source")) body.source = form.get("source");
  return body;
}

async function redriveCount() {
  try {
    const answer = await api("/admin/redrive", { method: "POST", body: redriveBody(true) });
    $("redrive-count").textContent = answer.matched + " published events match (dry run: nothing republished).";
    $("redrive-run").hidden = answer.matched === 0;
  } catch (err) {
    $("redrive-count").textContent = "error: " + err.message;
  }
}

async function redriveRun() {
  $("redrive-run").hidden = true;
  try {
    const answer = await api("/admin/redrive", { method: "POST", body: redriveBody(false) });
    $("redrive-progress").textContent = answer.matched + " events to put back…";
    const timer = setInterval(async () => {
      const pending = parseMetrics(await metricsText())
        .find((m) => m.name === "kallina_relay_redrive_pending_events");
      const left = pending ? pending.value : 0;
      $("redrive-progress").textContent = left > 0
        ? left + " of " + answer.matched + " still to put back"
        : "done: " + answer.matched + " events are back in the outbox";
      if (left <= 0) clearInterval(timer);
    }, 1000);
  } catch (err) {
    $("redrive-progress").textContent = "error: " + err.message;
  }
}

// ---- overview ---------------------------------------------------------------------------

function sumBy(metrics, name, pick) {
  const out = {};
  for (const m of metrics) {
    if (m.name !== name) continue;
    const key = pick(m.labels);
    out[key] = (out[key] || 0) + m.value;
  }
  return out;
}

async function refreshOverview() {
  try {
    const [text, ready] = await Promise.all([
      metricsText(),
      fetch("/readyz", { cache: "no-store" }).then((r) => r.json()),
    ]);
    const metrics = parseMetrics(text);
    const store = ready.store || {};
    $("ov-outbox").textContent = store.outbox_events + " / " + store.outbox_capacity;
    $("ov-oldest").textContent = store.outbox_oldest_age_seconds == null
      ? "–" : Math.round(store.outbox_oldest_age_seconds) + " s";
    const broker = ready.broker || {};
    $("ov-broker").textContent = broker.state + (broker.node ? " (node " + broker.node + ")" : "");
    $("ov-store").textContent = store.writable ? "writable" : "NOT writable";
    $("ov-quarantined").textContent = store.quarantined_events;
    const byOutcome = sumBy(metrics, "kallina_relay_webhooks_total", (l) =>
      l.outcome === "accepted" || l.outcome === "duplicate" ? l.outcome : "refused");
    state.samples.push({ at: Date.now(), counts: byOutcome });
    drawChart();
    const tbody = document.querySelector("#secrets tbody");
    tbody.replaceChildren();
    for (const m of metrics.filter((m) => m.name === "kallina_relay_signature_matches_total")) {
      tbody.append(el("tr", {}, el("td", {}, m.labels.source || ""),
        el("td", {}, m.labels.secret === "0" ? "0 (newest)" : m.labels.secret),
        el("td", { class: "num" }, m.value)));
    }
  } catch (_) { /* the next refresh tries again */ }
}

/// Bars per minute since the page opened, from differences of the counters.
function drawChart() {
  const minutes = new Map();
  for (let i = 1; i < state.samples.length; i++) {
    const a = state.samples[i - 1], b = state.samples[i];
    const minute = Math.floor(b.at / 60000);
    const bucket = minutes.get(minute) || { accepted: 0, duplicate: 0, refused: 0 };
    for (const key of Object.keys(bucket)) {
      bucket[key] += Math.max(0, (b.counts[key] || 0) - (a.counts[key] || 0));
    }
    minutes.set(minute, bucket);
  }
  const buckets = [...minutes.values()].slice(-30);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const width = 600, height = 120, slot = width / 30;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const max = Math.max(1, ...buckets.map((b) => b.accepted + b.duplicate + b.refused));
  buckets.forEach((b, i) => {
    let y = height;
    for (const key of ["accepted", "duplicate", "refused"]) {
      const h = (b[key] / max) * (height - 10);
      if (h <= 0) continue;
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", i * slot + 2);
      rect.setAttribute("width", slot - 4);
      rect.setAttribute("y", y - h);
      rect.setAttribute("height", h);
      rect.setAttribute("class", key);
      const title = document.createElementNS(ns, "title");
      title.textContent = b[key] + " " + key;
      rect.append(title);
      svg.append(rect);
      y -= h;
    }
  });
  $("chart").replaceChildren(svg);
}

function openOverview() {
  show("overview");
  refreshOverview();
  clearInterval(state.overviewTimer);
  state.overviewTimer = setInterval(refreshOverview, 5000);
}

// ---- wiring -----------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value);
    $("token").value = "";
  });
  $("sign-out").addEventListener("click", () => signOut());
  for (const button of document.querySelectorAll("#tabs button[data-tab]")) {
    button.addEventListener("click", () => {
      if (button.dataset.tab === "events") openEvents();
      else if (button.dataset.tab === "redrive") show("redrive");
      else openOverview();
    });
  }
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.filters = Object.fromEntries(new FormData($("filters")).entries());
    loadEvents();
  });
  $("more").addEventListener("click", loadOlder);
  $("back").addEventListener("click", () => { show("events"); });
  $("redeliver").addEventListener("click", () => { $("redeliver-confirm").hidden = false; });
  $("redeliver-no").addEventListener("click", () => { $("redeliver-confirm").hidden = true; });
  $("redeliver-yes").addEventListener("click", redeliver);
  $("redrive-form").addEventListener("submit", (event) => {
    event.preventDefault();
    redriveCount();
  });
  $("redrive-run").addEventListener("click", redriveRun);
  if (token()) signIn(token());
  else show("sign-in");
});
