// The live rollout page (web/templates/dashboard/rollout.html.j2): polls the same-origin JSON
// that the page names in data-source and redraws its numbers. Text is set with textContent only,
// so nothing the server stored can become markup.
"use strict";
(function () {
  const root = document.getElementById("live");
  if (!root) { return; }
  const source = root.dataset.source;
  const every = Number(root.dataset.every || "2000");
  // The actions and the rollout's card below are drawn by the server: when the rollout the page was
  // drawn with ends, or another one takes its place, one reload redraws them (no Abort button on a
  // promoted rollout).
  const drawnActive = root.dataset.status === "active";
  const drawnRollout = root.dataset.rollout || "";
  const text = (id, value) => { const el = document.getElementById(id); if (el) { el.textContent = value; } };
  const pct = (v) => (v === null || v === undefined) ? "—" : (v * 100).toFixed(2) + " %";
  const ms = (v) => (v === null || v === undefined) ? "—" : v.toFixed(2) + " ms";
  const num = (v) => (v === null || v === undefined) ? "—" : Number(v).toPrecision(3);
  const cell = (row, value) => { const td = document.createElement("td"); td.textContent = value; row.appendChild(td); };

  function draw(data) {
    const r = data.rollout;
    if (!r) { text("live-status", "no rollout"); return; }
    if ((drawnActive && r.status !== "active") || String(r.id) !== drawnRollout) { window.location.reload(); return; }
    text("live-status", r.status);
    text("live-split", r.traffic_percent + " % canary · " + (100 - r.traffic_percent) + " % champion");
    text("live-step", r.step === null ? "—" : String(r.step));
    text("live-reason", r.reason || "—");
    text("live-updated", new Date().toISOString());
    const body = document.getElementById("live-windows");
    if (!body) { return; }
    body.replaceChildren();
    for (const w of r.windows.slice().reverse()) {
      const row = document.createElement("tr");
      cell(row, String(w.step));
      cell(row, String(w.window));
      cell(row, w.at);
      cell(row, w.action);
      cell(row, w.traffic_percent + " %");
      cell(row, w.canary.requests + " / " + w.champion.requests);
      cell(row, ms(w.canary.latency_p99_ms) + " / " + ms(w.champion.latency_p99_ms));
      cell(row, pct(w.canary.error_rate) + " / " + pct(w.champion.error_rate));
      cell(row, num(w.psi));
      cell(row, pct(w.canary.accuracy) + " / " + pct(w.champion.accuracy));
      body.appendChild(row);
    }
    root.dataset.windows = String(r.windows.length);
    root.dataset.status = r.status;
  }

  async function poll() {
    try {
      const answer = await fetch(source, { credentials: "same-origin", cache: "no-store" });
      if (answer.status === 401) { window.location.assign(root.dataset.login); return; }
      if (answer.ok) { draw(await answer.json()); }
    } catch (e) {
      text("live-updated", "connection lost; retrying");
    }
    window.setTimeout(poll, every);
  }
  poll();
})();
