// Live updates for the portal: one websocket per page, re-subscribed after every reconnect.
// The socket only notifies; the page catches up from stored events after the last seq it applied.
(function () {
  "use strict";
  const subscriptions = []; // functions returning the subscribe message (so "after" is current)
  const handlers = [];
  let socket = null;
  let backoff = 500;
  let opened = false;

  function setState(text, cls) {
    const el = document.getElementById("live-state");
    if (el) { el.textContent = text; el.className = "live-state " + cls; }
  }

  function send(msg) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(msg));
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/ws/live/");
    socket.addEventListener("open", () => {
      backoff = 500;
      setState("● live", "on");
      subscriptions.forEach((make) => send(make()));
      // Notifications sent while the socket was down are lost: pages re-read what they show.
      if (opened) document.body.dispatchEvent(new Event("portal:reconnected"));
      opened = true;
    });
    socket.addEventListener("message", (e) => {
      let msg;
      try { msg = JSON.parse(e.data); } catch (_) { return; }
      handlers.forEach((h) => h(msg));
    });
    socket.addEventListener("close", (e) => {
      if (e.code === 4401) {  // the session ended: log in again instead of retrying forever
        setState("○ logged out", "off");
        location.assign("/login/?next=" + encodeURIComponent(location.pathname));
        return;
      }
      setState("○ reconnecting", "off");
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 10000);
    });
  }

  function subscribe(make) { subscriptions.push(make); send(make()); }
  function on(handler) { handlers.push(handler); }

  // -- formatting ---------------------------------------------------------------------------
  function bytes(n) {
    if (!n) return "0 bytes";
    const units = ["bytes", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }
  function duration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    return Math.floor(s / 60) + " min " + (s % 60) + " s";
  }
  const PHASES = { waiting: "Waiting for a worker", precheck: "Pre-check", disk_copy: "Disk copy",
    memory_precopy: "Memory pre-copy", switchover: "Switchover", done: "Done" };
  const TERMINAL = ["succeeded", "failed", "errored", "cancelled", "rejected", "expired"];

  // -- the request page: status changes re-render the panel, run events move the progress ------
  function watchRequestPage(requestId) {
    let runId = null;
    let lastSeq = 0;
    let lastEvent = null;
    let lastStatus = (document.getElementById("request-status") || {}).dataset?.status;
    // Stage signatures leave the status pending but change the page: they are counted apart.
    let lastApprovals = (document.getElementById("request-status") || {}).dataset?.approvals;
    const refresh = () => document.body.dispatchEvent(new Event("portal:request-status"));

    function attachRun() {
      const box = document.getElementById("run-progress");
      if (!box) return;
      const rendered = parseInt(box.dataset.seq || "0", 10);
      // A re-rendered panel can be older than the events already applied: apply the newest again.
      if (lastEvent && lastEvent.seq > rendered) apply(lastEvent);
      lastSeq = Math.max(lastSeq, rendered);
      box.dataset.seq = String(lastSeq);
      if (runId === null) {
        runId = parseInt(box.dataset.runId, 10);
        subscribe(() => ({ action: "subscribe", stream: "run", id: runId, after: lastSeq }));
      }
    }

    on((msg) => {
      // "subscribed" carries the status as of subscribing: what changed since the page was rendered.
      const isStatus = msg.type === "request.changed" || (msg.type === "subscribed" && msg.stream === "request");
      const approvals = msg.approvals === undefined ? lastApprovals : String(msg.approvals);
      if (isStatus && msg.id === requestId && (msg.status !== lastStatus || approvals !== lastApprovals)) {
        lastStatus = msg.status;
        lastApprovals = approvals;
        refresh();
      }
      if (msg.type === "run.event" && msg.id === runId && msg.seq > lastSeq) {
        lastSeq = msg.seq;
        lastEvent = msg;
        apply(msg);
        if (msg.status !== lastStatus) { lastStatus = msg.status; refresh(); }
      }
    });
    subscribe(() => ({ action: "subscribe", stream: "request", id: requestId }));
    // After the swap, so a panel swapped in shows the newest progress at once; and again after
    // settling: htmx then puts back the swapped-in elements' own class and style attributes,
    // which undoes a bar width set earlier (both run in the same task: no frame shows a bare bar).
    document.body.addEventListener("htmx:afterSwap", attachRun);
    document.body.addEventListener("htmx:afterSettle", attachRun);
    attachRun();
  }

  function apply(ev) {
    const set = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };
    const bar = document.getElementById("run-bar");
    if (bar) {
      bar.style.width = ev.percent + "%";
      bar.dataset.percent = String(ev.percent);  // what sizeBars applies again after htmx settles
      bar.parentElement.setAttribute("aria-valuenow", String(Math.round(ev.percent)));
    }
    const phase = document.getElementById("run-phase");
    if (phase) { phase.textContent = PHASES[ev.phase] || ev.phase; phase.dataset.phase = ev.phase; }
    set("run-percent", ev.percent.toFixed(1));
    set("run-bytes", bytes(ev.bytes_done) + " of " + bytes(ev.bytes_total));
    set("run-rate", ev.rate_bytes_per_s ? bytes(ev.rate_bytes_per_s) + "/s" : "—");
    set("run-eta", TERMINAL.includes(ev.status) ? "—" : duration(ev.eta_s));
    const status = document.getElementById("request-status");
    if (status) {
      status.dataset.status = ev.status;
      status.className = "status big status-" + ev.status;
      status.textContent = ev.status.charAt(0).toUpperCase() + ev.status.slice(1);
    }
    const list = document.getElementById("run-events");
    if (list && !list.querySelector('[data-seq="' + ev.seq + '"]')) {
      const li = document.createElement("li");
      li.dataset.seq = ev.seq;
      li.value = ev.seq;
      const t = new Date(ev.at);
      li.textContent = t.toISOString().substring(11, 19) + " " + (PHASES[ev.phase] || ev.phase) + " · " +
        Math.round(ev.percent) + "%" + (ev.message ? " · " + ev.message : "");
      list.appendChild(li);
      while (list.children.length > 50) list.removeChild(list.firstChild);
      list.scrollTop = list.scrollHeight;
    }
  }

  // -- lists: any change to a request refreshes the list fragment -----------------------------
  function watchRequests(stream) {
    on((msg) => {
      // Also re-read once subscribed: a change between rendering and subscribing is not missed.
      if (msg.type === "request.changed" || (msg.type === "subscribed" && msg.stream === stream)) {
        document.body.dispatchEvent(new Event("portal:requests-changed"));
      }
    });
    subscribe(() => ({ action: "subscribe", stream: stream }));
  }

  // Bars are sized by script: a CSP without 'unsafe-inline' ignores style attributes.
  function sizeBars() {
    document.querySelectorAll(".bar[data-percent]").forEach((bar) => { bar.style.width = bar.dataset.percent + "%"; });
  }

  // The Migrate form shows only the targets the chosen kind of move needs.
  function migrateForm() {
    const form = document.getElementById("migrate-form") || document.getElementById("migrate-many-form");
    if (!form) return;
    const sync = () => {
      const kind = form.querySelector("input[name=kind]:checked")?.value || "compute";
      document.getElementById("host-field").hidden = kind === "storage";
      document.getElementById("datastore-field").hidden = kind === "compute";
    };
    form.addEventListener("change", sync);
    sync();
  }

  // Ticked boxes ("Migrate selected", "Approve selected") survive the refreshes that re-render
  // their rows (a live queue update, a filter): the swap replaces them, so their state is carried.
  function keepSelection(body) {
    const boxes = () => document.querySelectorAll("input[type=checkbox][form]");
    const key = (box) => box.getAttribute("form") + ":" + box.value;
    let ticked = new Set();
    body.addEventListener("htmx:beforeSwap", () => {
      ticked = new Set([...boxes()].filter((box) => box.checked).map(key));
    });
    body.addEventListener("htmx:afterSwap", () => {
      boxes().forEach((box) => { if (ticked.has(key(box))) box.checked = true; });
    });
  }

  // Pages say what they watch in data attributes on <body>; no inline script is needed.
  document.addEventListener("DOMContentLoaded", () => {
    const body = document.body;
    sizeBars();
    migrateForm();
    // Sized as soon as new content is in (a bar that replaced no bar would stay bare until
    // settling, 20 ms later), and again after settling, which resets the style attributes of the
    // elements that replaced others.
    body.addEventListener("htmx:afterSwap", sizeBars);
    body.addEventListener("htmx:afterSettle", sizeBars);
    keepSelection(body);
    if (body.dataset.live !== "on") return;
    connect();
    if (body.dataset.watchRequest) watchRequestPage(parseInt(body.dataset.watchRequest, 10));
    if (body.dataset.watchRequests) watchRequests(body.dataset.watchRequests);
  });

  window.PortalLive = { start: connect, subscribe, on, watchRequestPage, watchRequests };
})();
