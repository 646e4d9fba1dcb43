// The medfl dashboard: reads the coordinator's JSON API every two seconds and draws
// it. Text goes in with textContent; only the coordinator's own SVG charts (escaped
// server-side) go in as markup.
"use strict";

const REFRESH_MS = 2000;
let selected = decodeURIComponent(location.hash.slice(1)) || null;
let overview = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function cell(text, left) {
  return el("td", left ? { class: "l" } : {}, text);
}

function num(v, digits) {
  return v == null || !isFinite(v) ? "–" : Number(v).toFixed(digits);
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "–";
}

function ago(ms, now) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  return s < 120 ? s + " s ago" : Math.round(s / 60) + " min ago";
}

function stateBadge(state) {
  return el("span", { class: "state " + state }, state.replace("_", " "));
}

function showError(message) {
  const p = document.getElementById("error");
  p.textContent = message || "";
  p.hidden = !message;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401) location.reload();
    throw new Error(body.error || response.status + " " + response.statusText);
  }
  return body;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderOverview(o) {
  overview = o;
  document.getElementById("viewer").textContent =
    o.viewer.identity + " (" + o.viewer.role + ", by " + o.viewer.via + ")";
  document.getElementById("updated").textContent = "updated " + new Date(o.now_ms).toLocaleTimeString();
  if (!selected && o.studies.length) {
    const running = o.studies.find((s) => s.state === "running");
    selected = (running || o.studies[o.studies.length - 1]).id;
  }
  fill(
    document.querySelector("#studies tbody"),
    o.studies.map((s) => {
      const tr = el(
        "tr",
        { "data-study": s.id, class: s.id === selected ? "selected" : "" },
        cell(s.name + " (" + s.id + ")", true),
        el("td", { class: "l" }, stateBadge(s.state)),
        cell(s.rounds_completed + " / " + s.rounds_total),
        cell(s.budget_epsilon == null ? "–" : num(s.epsilon_spent, 4)),
        cell(num(s.budget_epsilon, 4)),
        cell(s.created_by, true)
      );
      tr.addEventListener("click", () => select(s.id));
      return tr;
    })
  );
  fill(
    document.querySelector("#sites tbody"),
    o.sites.map((s) => {
      const last = s.refusals[0];
      return el(
        "tr",
        { "data-site": s.name },
        cell(s.name, true),
        el("td", { class: "l" }, el("span", { class: s.connected ? "on" : "off" }, s.connected ? "connected" : "not connected")),
        cell(ago(s.last_seen_ms, o.now_ms), true),
        cell(s.agent_version, true),
        cell(s.datasets.join(", "), true),
        cell(s.refusals.length),
        cell(last ? last.study + " round " + last.round + ": " + last.reason : "–", true)
      );
    })
  );
  const studySelect = document.querySelector("#audit-filter select[name=study]");
  const current = studySelect.value;
  studySelect.replaceChildren(
    el("option", { value: "" }, "all"),
    ...o.studies.map((s) => el("option", { value: s.id }, s.name + " (" + s.id + ")"))
  );
  studySelect.value = current;
}

function renderControls(d) {
  const box = document.getElementById("controls");
  box.replaceChildren();
  if (!d.can_control) return;
  const state = d.study.state;
  const actions = [];
  if (state === "running" || state === "created") actions.push("pause");
  if (state === "paused") actions.push("resume");
  if (!["completed", "aborted", "failed", "budget_exhausted"].includes(state)) actions.push("abort");
  for (const action of actions) {
    const b = el("button", { type: "button", "data-action": action }, action);
    b.addEventListener("click", async () => {
      if (action === "abort" && !confirm("Abort study " + d.study.id + "? This cannot be undone.")) return;
      try {
        await api("/api/studies/" + encodeURIComponent(d.study.id) + "/" + action, {
          method: "POST",
          headers: { "x-medfl-action": action },
        });
        await refresh();
      } catch (e) {
        showError(action + " failed: " + e.message);
      }
    });
    box.append(b);
  }
}

function renderCurrentRound(d, now) {
  const box = document.getElementById("current-round");
  const o = d.open;
  if (!o) {
    box.replaceChildren(el("h3", {}, "Current round"), el("p", { class: "muted" }, "No round is open (" + d.study.state.replace("_", " ") + ")."));
    return;
  }
  const left = Math.max(0, Math.round((o.deadline_ms - now) / 1000));
  const list = el("ul", {});
  for (const site of o.selected) {
    const got = o.received.includes(site);
    list.append(el("li", { "data-site": site }, el("span", { class: got ? "on" : "muted" }, got ? "✔ " : "… "), site, got ? " — update received" : " — training"));
  }
  box.replaceChildren(
    el("h3", {}, "Current round " + o.round),
    el("p", {}, o.received.length + " of " + o.selected.length + " updates received (at least " + o.min_sites + " needed); deadline in " + left + " s"),
    list
  );
}

function renderPrivacy(d) {
  const summary = document.getElementById("privacy-summary");
  const tbody = document.querySelector("#ledger-table tbody");
  if (!d.privacy) {
    summary.textContent = "This study runs without [privacy]: it has no ledger.";
    fill(tbody, []);
    return;
  }
  const p = d.privacy;
  summary.textContent =
    "Unit: " + p.unit.replace("_", " ") + ". Budget ε = " + p.budget_epsilon + " at δ = " + p.delta + " per ledger. Accountant: " + p.accountant + ". Noise: " + p.enforcement + ".";
  if (!d.ledgers.length) {
    fill(tbody, [el("tr", {}, el("td", { class: "l muted", colSpan: 4 }, "no charges yet: a ledger is charged when a round commits"))]);
    return;
  }
  fill(
    tbody,
    d.ledgers.map((l) => {
      const share = Math.min(1, l.spent / p.budget_epsilon);
      const bar = el("span", { class: "bar" }, el("span", { class: share > 0.9 ? "high" : "" }));
      bar.firstChild.style.width = (100 * share).toFixed(1) + "%";
      return el(
        "tr",
        { "data-ledger": l.name, "data-epsilon": String(l.spent) },
        cell(l.name, true),
        cell(num(l.spent, 4)),
        cell(num(p.budget_epsilon, 4)),
        el("td", { class: "l" }, bar, " " + (100 * share).toFixed(1) + " %")
      );
    })
  );
}

function renderStudy(d) {
  const section = document.getElementById("study");
  section.hidden = false;
  document.getElementById("study-title").replaceChildren("Study " + d.study.name + " (" + d.study.id + ") ", stateBadge(d.study.state));
  const parts = [
    d.study.rounds_completed + " of " + d.study.rounds_total + " rounds committed",
    "strategy " + (d.strategy || "?"),
    d.secure_aggregation ? "secure aggregation on" : "secure aggregation off",
    "created by " + d.study.created_by + " " + when(d.study.created_ms),
  ];
  if (d.study.reason) parts.push("reason: " + d.study.reason);
  document.getElementById("study-summary").textContent = parts.join(" · ");
  renderControls(d);
  renderCurrentRound(d, d.now_ms);
  renderPrivacy(d);
  // The charts are the coordinator's SVG (medfl_shared::chart), text escaped there.
  document.getElementById("epsilon-chart").innerHTML = d.charts.epsilon || "";
  document.getElementById("training-charts").innerHTML = d.charts.training.join("");
  fill(
    document.querySelector("#rounds-table tbody"),
    d.rounds
      .slice()
      .reverse()
      .map((r) =>
        el(
          "tr",
          { "data-round": String(r.round), "data-committed": String(r.committed) },
          cell(r.round),
          cell(r.attempt),
          cell(r.committed ? "committed" : r.reason === "open" ? "open" : "failed", true),
          cell(
            d.open && d.open.round === r.round && r.reason === "open"
              ? d.open.received.length + " / " + d.open.selected.length
              : r.contributors.length + " / " + r.selected.length
          ),
          cell(r.num_examples),
          cell(num(r.mean_train_loss, 4)),
          cell(r.eval ? num(r.eval.accuracy, 4) : "–"),
          cell(num(r.clip_norm, 4)),
          cell(r.finished_ms > r.started_ms ? ((r.finished_ms - r.started_ms) / 1000).toFixed(1) : "–"),
          cell(r.committed ? r.contributors.join(", ") : r.reason, true)
        )
      )
  );
  const refusals = document.getElementById("refusals");
  refusals.replaceChildren(
    ...(d.refusals.length
      ? d.refusals.map((r) => el("li", {}, r.site + " (round " + r.round + ", " + when(r.at_ms) + "): " + r.reason))
      : [el("li", { class: "muted" }, "none")])
  );
  document.getElementById("manifest").textContent = d.manifest_toml;
}

async function refreshAudit() {
  const form = document.getElementById("audit-filter");
  const params = new URLSearchParams(new FormData(form));
  try {
    const a = await api("/api/audit?" + params.toString());
    document.getElementById("audit-count").textContent =
      a.entries.length + " shown of " + a.total + " entries" + (a.entries.length >= a.limit ? " (newest " + a.limit + ")" : "");
    fill(
      document.querySelector("#audit-table tbody"),
      a.entries.map((e) =>
        el(
          "tr",
          { "data-seq": String(e.seq) },
          cell(e.seq),
          cell(when(e.at_ms), true),
          cell(e.actor, true),
          cell(e.action, true),
          cell(e.study || "–", true),
          el("td", { class: "l details" }, e.details)
        )
      )
    );
  } catch (e) {
    showError("audit log: " + e.message);
  }
}

function renderQueries(d) {
  fill(
    document.querySelector("#queries tbody"),
    d.queries.map((q) =>
      el(
        "tr",
        { "data-query": q.id },
        cell(q.name + " (" + q.id + ")", true),
        cell(q.dataset, true),
        el("td", { class: "l" }, stateBadge(q.state), q.reason ? " " + q.reason : ""),
        cell(q.answered.length + " / " + q.selected.length),
        cell(num(q.epsilon, 4)),
        cell(q.created_by, true)
      )
    )
  );
  const results = document.getElementById("query-results");
  results.replaceChildren();
  for (const q of d.queries.filter((q) => q.result)) {
    const box = el("div", { class: "card", "data-query-result": q.id });
    box.appendChild(el("h3", {}, q.name + " (" + q.id + "): " + q.result.sites.length + " sites, ε = " + num(q.result.epsilon, 4)));
    const chart = el("div", { class: "chart" });
    // The coordinator's own SVG (medfl_shared::chart), text escaped there.
    chart.innerHTML = q.charts.join("");
    box.appendChild(chart);
    results.appendChild(box);
  }
}

async function refresh() {
  try {
    renderOverview(await api("/api/overview"));
    renderQueries(await api("/api/queries"));
    if (selected) renderStudy(await api("/api/studies/" + encodeURIComponent(selected)));
    showError("");
  } catch (e) {
    showError(e.message);
  }
}

function select(id) {
  selected = id;
  location.hash = encodeURIComponent(id);
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("audit-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    refreshAudit();
  });
  document.getElementById("sign-out").addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", headers: { "x-medfl-action": "logout" }, credentials: "same-origin" });
    location.reload();
  });
  window.addEventListener("hashchange", () => {
    const id = decodeURIComponent(location.hash.slice(1));
    if (id && id !== selected) select(id);
  });
  refresh().then(refreshAudit);
  setInterval(refresh, REFRESH_MS);
  setInterval(refreshAudit, 5 * REFRESH_MS);
});
