// Move plans, live: the plan page re-reads its panel when the plan changes and moves each VM's
// progress bar from its run's events; the approvals page re-reads its "Plans" section.
// Uses the one socket of live.js (window.PortalLive); no inline script (the CSP forbids it).
(function () {
  "use strict";
  const PHASES = { waiting: "Waiting for a worker", precheck: "Pre-check", disk_copy: "Disk copy",
    memory_precopy: "Memory pre-copy", switchover: "Switchover", done: "Done" };

  function watchPlanPage(live, planId) {
    const watched = new Set(); // run ids already subscribed
    const lastSeq = {}; // run id -> last seq applied
    const lastEvent = {}; // run id -> newest event (a re-rendered panel may be older)
    let lastStatus = (document.getElementById("plan-status") || {}).dataset?.status;
    const refresh = () => document.body.dispatchEvent(new Event("portal:plan-changed"));

    function attachRuns() {
      document.querySelectorAll("#plan-items tr[data-run-id]").forEach((row) => {
        const runId = parseInt(row.dataset.runId, 10);
        if (lastEvent[runId]) applyRun(lastEvent[runId]);
        if (watched.has(runId)) return;
        watched.add(runId);
        lastSeq[runId] = lastSeq[runId] || 0;
        live.subscribe(() => ({ action: "subscribe", stream: "run", id: runId, after: lastSeq[runId] }));
      });
    }

    function applyRun(ev) {
      const row = document.querySelector('#plan-items tr[data-run-id="' + ev.id + '"]');
      if (!row) return;
      const bar = row.querySelector(".item-bar");
      if (bar) { bar.dataset.percent = ev.percent; bar.style.width = ev.percent + "%"; }
      const pct = row.querySelector(".item-percent");
      if (pct) pct.textContent = Math.round(ev.percent);
      const phase = row.querySelector(".item-phase");
      if (phase) phase.textContent = PHASES[ev.phase] || ev.phase;
      const status = row.querySelector(".item-status");
      if (status && ["queued", "running", "cancelling"].includes(ev.status)) {
        status.className = "status status-" + ev.status + " item-status";
        status.textContent = ev.status.charAt(0).toUpperCase() + ev.status.slice(1);
      }
    }

    live.on((msg) => {
      const isPlan = msg.type === "plan.changed" || (msg.type === "subscribed" && msg.stream === "plan");
      if (isPlan && msg.id === planId) {
        if (msg.type === "plan.changed") {
          const set = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };
          set("plan-done", msg.done);
          set("plan-total", msg.total);
          set("plan-percent", msg.percent.toFixed(1));
          const bar = document.getElementById("plan-bar");
          if (bar) bar.style.width = msg.percent + "%";
        }
        // Any change to the plan or its items (a new attempt, a settled VM): re-read the panel.
        if (msg.type === "plan.changed" || msg.status !== lastStatus) { lastStatus = msg.status; refresh(); }
      }
      if (msg.type === "run.event" && watched.has(msg.id) && msg.seq > (lastSeq[msg.id] || 0)) {
        lastSeq[msg.id] = msg.seq;
        lastEvent[msg.id] = msg;
        applyRun(msg);
      }
    });
    live.subscribe(() => ({ action: "subscribe", stream: "plan", id: planId }));
    // Once the re-read panel is in, size its bars and re-apply the newest run events, which may be
    // newer than the panel; again after htmx has settled it (settling restores the attributes of
    // the elements that replaced others, which undoes a width set earlier).
    const resize = () => {
      document.querySelectorAll("#plan-panel .bar[data-percent]").forEach((bar) => {
        bar.style.width = bar.dataset.percent + "%";
      });
      attachRuns();
    };
    document.body.addEventListener("htmx:afterSwap", resize);
    document.body.addEventListener("htmx:afterSettle", resize);
    attachRuns();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const body = document.body;
    const live = window.PortalLive;
    if (!live || body.dataset.live !== "on") return;
    if (body.dataset.watchPlan) watchPlanPage(live, parseInt(body.dataset.watchPlan, 10));
    // The approvals page: plans arrive on its "approvals" stream.
    if (document.getElementById("plan-cards")) {
      live.on((msg) => {
        if (msg.type === "plan.changed") document.body.dispatchEvent(new Event("portal:plans-changed"));
      });
    }
  });
})();
