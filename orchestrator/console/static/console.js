// The console page: plain JavaScript over the JSON API (/openapi.json), no build step.
// Views are chosen by the URL's hash: #/ (sagas), #/saga/<id>, #/parked. Every view polls
// while it is shown, so counts, a saga's progress and the parked queue stay live.
"use strict";

const POLL_MS = 2000;
const main = document.getElementById("main");
const notice = document.getElementById("notice");
const operatorInput = document.getElementById("operator");
const tokenInput = document.getElementById("token");
let timer = null;
let view = 0; // bumped on every navigation: a stale poll must not draw over a newer view

operatorInput.value = localStorage.getItem("saga-operator") || "";
operatorInput.addEventListener("change", () => localStorage.setItem("saga-operator", operatorInput.value));
tokenInput.value = sessionStorage.getItem("saga-token") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("saga-token", tokenInput.value));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, body) {
  const headers = {};
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    init.body = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
    if (operatorInput.value) headers["X-Saga-Operator"] = operatorInput.value;
    if (tokenInput.value) headers["Authorization"] = "Bearer " + tokenInput.value;
  }
  const response = await fetch(path, init);
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

function say(text, bad = false) {
  notice.textContent = text;
  notice.className = bad ? "bad" : "good";
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "-";
}

function json(value) {
  return el("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function poll(draw) {
  const mine = ++view;
  clearTimeout(timer);
  const round = async () => {
    try {
      await draw(() => mine === view);
    } catch (error) {
      if (mine === view) say(error.message, true);
    }
    if (mine === view) timer = setTimeout(round, POLL_MS);
  };
  round();
}

// --- the saga list ---------------------------------------------------------------------------

const FILTERS = ["status", "saga_type", "version", "step", "id_prefix", "created_from", "created_to"];

function filterQuery(form) {
  const query = new URLSearchParams();
  for (const name of FILTERS) {
    let value = form.elements[name].value.trim();
    if (!value) continue;
    if (name.startsWith("created_")) value = new Date(value).toISOString();
    query.set(name, value);
  }
  return query;
}

function sagaList() {
  const saved = new URLSearchParams(location.hash.split("?")[1] || "");
  const form = el("form", { class: "filters", "data-testid": "filters" },
    el("label", {}, "status ", el("select", { name: "status", "data-testid": "filter-status" },
      el("option", { value: "" }, "any"),
      ...["started", "pending", "compensating", "stuck", "completed", "failed"].map(
        (s) => el("option", { value: s, selected: saved.get("status") === s }, s)))),
    ...[["saga_type", "type"], ["version", "version"], ["step", "step"], ["id_prefix", "id prefix"]].map(
      ([name, label]) => el("label", {}, label + " ",
        el("input", { name, value: saved.get(name) || "", size: name === "version" ? 3 : 14, "data-testid": "filter-" + name }))),
    el("label", {}, "started from ", el("input", { name: "created_from", type: "datetime-local" })),
    el("label", {}, "to ", el("input", { name: "created_to", type: "datetime-local" })),
    el("button", { type: "submit", "data-testid": "apply" }, "Apply"));
  const counts = el("div", { class: "counts", "data-testid": "counts" });
  const table = el("tbody");
  const more = el("button", { hidden: true, "data-testid": "more" }, "More");
  const bulk = el("div", { class: "bulk", "data-testid": "bulk" });
  let cursor = null;
  let paged = false; // once more pages are shown, polling refreshes the counts only
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = "#/?" + filterQuery(form).toString();
  });
  more.addEventListener("click", async () => {
    paged = true;
    const page = await api("/api/sagas?" + withCursor(cursor));
    table.append(...page.sagas.map(row));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  });
  function withCursor(at) {
    const query = filterQuery(form);
    if (at) query.set("cursor", at);
    return query.toString();
  }
  for (const action of ["retry", "abort", "resolve"]) {
    bulk.append(el("button", { "data-testid": "bulk-" + action, onclick: () => bulkAction(action, form) },
      action + " all matching"));
  }
  main.replaceChildren(el("h1", {}, "Sagas"), counts, form, bulk,
    el("table", { "data-testid": "sagas" }, el("thead", {}, el("tr", {},
      ...["saga", "type", "ver", "status", "on step", "updated"].map((h) => el("th", {}, h)))), table), more);
  poll(async (current) => {
    const [counted, page] = await Promise.all([api("/api/counts"), paged ? null : api("/api/sagas?" + withCursor(null))]);
    if (!current()) return;
    drawCounts(counts, counted);
    if (paged) return;
    table.replaceChildren(...page.sagas.map(row));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  });
}

function drawCounts(box, counted) {
  const total = {};
  for (const { status, count } of counted.counts) total[status] = (total[status] || 0) + count;
  box.replaceChildren(...counted.statuses.map((status) =>
    el("a", { href: "#/?status=" + status, class: "count " + status, "data-testid": "count-" + status },
      status + " ", el("b", {}, String(total[status] || 0)))));
}

function row(saga) {
  const step = saga.current_step;
  const on = step ? (step.direction === "compensation" ? "undo " : "") + step.name + " (" + step.status + ")" : "-";
  return el("tr", { "data-testid": "saga-row" },
    el("td", {}, el("a", { href: "#/saga/" + encodeURIComponent(saga.saga_id) }, saga.saga_id)),
    el("td", {}, saga.saga_type), el("td", {}, "v" + saga.version),
    el("td", {}, el("span", { class: "status " + saga.status }, saga.status), saga.held ? " HELD" : ""),
    el("td", {}, on), el("td", {}, when(saga.updated_at)));
}

async function bulkAction(action, form) {
  const query = filterQuery(form);
  const selection = {};
  for (const [key, value] of query) if (!key.startsWith("created_")) selection[key] = key === "version" ? Number(value) : value;
  try {
    const dry = await api("/api/bulk/" + action, { selection, dry_run: true });
    if (!confirm(`${action} ${dry.matched} saga(s) matching this filter?`)) return;
    const done = await api("/api/bulk/" + action, { selection, dry_run: false, expected: dry.matched });
    say(`${action}: ${done.applied.length} applied, ${done.refused.length} refused`);
  } catch (error) {
    say(error.message, true);
  }
}

// --- one saga --------------------------------------------------------------------------------

const ACTIONS = { retry: ["stuck"], resolve: ["stuck"], abort: ["started", "pending"] };

function sagaPage(sagaId) {
  main.replaceChildren(el("p", {}, "loading " + sagaId));
  poll(async (current) => {
    const saga = await api("/api/sagas/" + encodeURIComponent(sagaId));
    if (current()) drawSaga(saga);
  });
}

function drawSaga(saga) {
  const actions = el("div", { class: "actions" },
    ...Object.entries(ACTIONS).map(([action, statuses]) =>
      el("button", { "data-testid": "action-" + action, disabled: !statuses.includes(saga.status) || !!saga.held,
        onclick: () => act(saga, action) }, action)));
  const step = saga.current_step;
  main.replaceChildren(...[
    el("h1", {}, saga.saga_id, " ", el("span", { class: "status " + saga.status, "data-testid": "saga-status" }, saga.status)),
    el("p", {}, `${saga.saga_type} v${saga.version} · started ${when(saga.created_at)}`,
      step ? ` · on ${step.direction === "compensation" ? "undo " : ""}${step.name} (${step.status})` : "",
      saga.failure_reason ? ` · ${saga.failure_reason}` : ""),
    saga.held ? el("p", { class: "bad" }, "HELD: " + saga.held.reason) : null,
    actions,
    el("h2", {}, "Timeline"), timeline(saga),
    el("p", { class: "legend" }, el("span", { class: "key forward" }), "step ", el("span", { class: "key failed" }),
      "failed or timed out ", el("span", { class: "key compensation" }), "compensation · | an attempt sent · ",
      el("span", { class: "key late" }), "late reply"),
    el("h2", {}, "Steps"), stepsTable(saga),
    el("h2", {}, "Data"), json(saga.data),
    el("h2", {}, "History"), historyTable(saga)].filter((node) => node !== null));
}

async function act(saga, action) {
  let reason;
  if (action !== "retry") {
    reason = prompt(`Reason to ${action} saga ${saga.saga_id} (recorded in its history):`, "");
    if (reason === null) return;
  } else if (!confirm(`Retry saga ${saga.saga_id}? Its failing compensation is sent again.`)) {
    return;
  }
  try {
    const done = await api(`/api/sagas/${encodeURIComponent(saga.saga_id)}/${action}`, { reason: reason || null });
    say(`saga ${done.saga_id}: ${done.before} -> ${done.after} (by ${done.by})`);
    sagaPage(saga.saga_id);
  } catch (error) {
    say(error.message, true);
  }
}

function stepsTable(saga) {
  return el("table", { "data-testid": "steps" },
    el("thead", {}, el("tr", {}, ...["step", "status", "attempts", "undo attempts", "result", "error"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...saga.steps.map((step) => el("tr", { "data-testid": "step-" + step.name },
      el("td", {}, step.name, step.group ? ` (parallel: ${step.group})` : ""),
      el("td", {}, step.status, step.in_doubt ? " (in doubt)" : "",
        step.heartbeat_at ? ` · heartbeat ${when(step.heartbeat_at)}${step.heartbeat ? ": " + step.heartbeat : ""}` : ""),
      el("td", {}, String(step.attempts)), el("td", {}, String(step.compensation_attempts)),
      el("td", { "data-testid": "result-" + step.name }, step.result ? json(step.result) : "-"),
      el("td", {}, step.error ? `${step.error.type}: ${step.error.message}` : "-")))));
}

function historyTable(saga) {
  return el("table", { "data-testid": "history" },
    el("thead", {}, el("tr", {}, ...["at", "event", "step", "attempt", "detail", "by"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...saga.history.map((entry) => el("tr", {},
      el("td", {}, when(entry.at)), el("td", {}, entry.event), el("td", {}, entry.step || ""),
      el("td", {}, entry.attempt ?? ""), el("td", {}, entry.detail || ""), el("td", {}, entry.by || "")))));
}

// Steps and compensations on a time axis: one row per step, a bar from its first command to
// its answer and another for its compensation; ticks for attempts, red dots for late replies.
function timeline(saga) {
  const start = Date.parse(saga.created_at);
  const end = Math.max(Date.parse(saga.finished_at || saga.updated_at), ...saga.history.map((h) => Date.parse(h.at)), start + 1);
  const width = 900, left = 170, rowHeight = 26, top = 22;
  const x = (iso) => left + ((Date.parse(iso) - start) / (end - start)) * (width - left - 10);
  const chart = svg("svg", { width, height: top + rowHeight * saga.steps.length + 10, "data-testid": "timeline", class: "timeline" });
  chart.append(svg("text", { x: left, y: 12 }, "0s"), svg("text", { x: width - 60, y: 12 }, ((end - start) / 1000).toFixed(1) + "s"));
  saga.steps.forEach((step, index) => {
    const y = top + index * rowHeight;
    chart.append(svg("text", { x: 4, y: y + 15 }, step.name));
    const mine = saga.history.filter((entry) => entry.step === step.name);
    const span = (from, to, kind) => {
      if (!from) return;
      const x1 = x(from.at), x2 = Math.max(x(to ? to.at : saga.updated_at), x1 + 3);
      const bar = svg("rect", { x: x1, y: y + 4, width: x2 - x1, height: 14, class: "bar " + kind, "data-testid": `bar-${kind}-${step.name}` });
      bar.append(svg("title", {}, `${step.name} ${kind}: ${from.event} → ${to ? to.event : "(waiting)"}`));
      chart.append(bar);
    };
    const first = mine.find((e) => e.event === "SagaStepStarted");
    const answer = mine.find((e) => ["SagaStepCompleted", "SagaStepFailed", "SagaStepTimedOut", "SagaStepNotPickedUp"].includes(e.event));
    span(first, answer, answer && answer.event !== "SagaStepCompleted" ? "failed" : "forward");
    const undo = mine.find((e) => e.event === "SagaCompensationStarted");
    const undone = [...mine].reverse().find((e) => e.event === "SagaCompensationCompleted" || e.event === "SagaCompensationFailed");
    span(undo, undone && Date.parse(undone.at) >= Date.parse(undo ? undo.at : 0) ? undone : null, "compensation");
    for (const entry of mine) {
      if (entry.event === "SagaStepStarted" || entry.event === "SagaCompensationStarted") {
        const tick = svg("line", { x1: x(entry.at), x2: x(entry.at), y1: y + 2, y2: y + 20, class: "tick" });
        tick.append(svg("title", {}, `${entry.event} #${entry.attempt ?? ""}`));
        chart.append(tick);
      }
      if (entry.event === "SagaLateReply") {
        const dot = svg("circle", { cx: x(entry.at), cy: y + 11, r: 4, class: "late" });
        dot.append(svg("title", {}, "late reply: " + (entry.detail || "")));
        chart.append(dot);
      }
    }
  });
  return chart;
}

// --- parked messages -------------------------------------------------------------------------

function parkedPage() {
  const table = el("tbody");
  const detail = el("div", { "data-testid": "parked-detail" });
  main.replaceChildren(el("h1", {}, "Parked messages"),
    el("table", { "data-testid": "parked" }, el("thead", {}, el("tr", {},
      ...["message", "from queue", "saga", "reason", "sent"].map((h) => el("th", {}, h)))), table), detail);
  poll(async (current) => {
    const listed = await api("/api/parked");
    if (!current()) return;
    table.replaceChildren(...listed.parked.map((message) => el("tr", { "data-testid": "parked-row" },
      el("td", {}, el("a", { href: "#", onclick: (event) => { event.preventDefault(); showParked(message.message_id, detail); } }, message.message_id)),
      el("td", {}, message.queue || "?"), el("td", {}, message.saga_id || "-"),
      el("td", {}, message.reason), el("td", {}, when(message.parked_at)))));
    if (!listed.parked.length) table.append(el("tr", {}, el("td", { colspan: 5 }, "nothing is parked")));
  });
}

async function showParked(messageId, box) {
  try {
    const message = await api("/api/parked/" + encodeURIComponent(messageId));
    let body = message.body;
    try { body = JSON.stringify(JSON.parse(body), null, 2); } catch (_) { /* not JSON: as it is */ }
    box.replaceChildren(
      el("h2", {}, "Message " + message.message_id),
      el("p", {}, "reason: ", el("b", {}, message.reason)),
      el("p", {}, `from ${message.queue || "(unknown queue)"} · saga ${message.saga_id || "-"} · ${message.kind || ""}`),
      el("div", { class: "actions" },
        el("button", { "data-testid": "replay", disabled: !message.queue, onclick: () => settleParked(message, "replay", box) }, "replay"),
        el("button", { "data-testid": "discard", onclick: () => settleParked(message, "discard", box) }, "discard")),
      el("h3", {}, "headers"), json(message.headers),
      el("h3", {}, "body"), el("pre", { class: "json", "data-testid": "parked-body" }, body));
  } catch (error) {
    say(error.message, true);
  }
}

async function settleParked(message, action, box) {
  const question = action === "replay"
    ? `Send message ${message.message_id} back to ${message.queue}?`
    : `Delete message ${message.message_id} for good?`;
  if (!confirm(question)) return;
  try {
    const done = await api(`/api/parked/${encodeURIComponent(message.message_id)}/${action}`, {});
    say(`message ${done.message_id} ${done.outcome}` + (done.outcome === "replayed" ? ` to ${done.queue}` : ""));
    box.replaceChildren();
  } catch (error) {
    say(error.message, true);
  }
}

// --- routing ---------------------------------------------------------------------------------

function route() {
  const hash = location.hash || "#/";
  if (hash.startsWith("#/saga/")) sagaPage(decodeURIComponent(hash.slice(7)));
  else if (hash.startsWith("#/parked")) parkedPage();
  else sagaList();
}

window.addEventListener("hashchange", route);
api("/api/whoami").then((me) => {
  document.getElementById("token-label").hidden = !me.actions_need_token;
  operatorInput.disabled = me.actions_need_token;
}).catch((error) => say(error.message, true));
route();
