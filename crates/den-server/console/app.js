// den's web console: a single page over the public /v1 API (see api.js).
// No framework: `el()` builds DOM nodes (text always goes in as text, never
// as HTML), each view renders into #view and returns a cleanup function
// that stops its timers and sockets when the route changes.

import { Terminal } from "./vendor/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit.mjs";
import * as api from "./api.js";

const POLL_MS = 3000;
// How soon a broken live stream of sprite changes is opened again.
const LIVE_RETRY_MS = 5000;
// The sprite list's fallback poll (changes arrive on the live stream).
const LIST_POLL_MS = 10000;
const LOG_POLL_MS = 2000;
const LOG_LINES = 500;
// The login shell: bash where the image has it, else sh.
const SHELL = ["sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash -l || exec sh -l"];

// ---------------------------------------------------------------- DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const $ = (sel, root = document) => root.querySelector(sel);

function toast(message, kind = "info") {
  const t = el("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  $("#toasts").append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 4000);
}

function banner(message) {
  const b = $("#banner");
  b.textContent = message || "";
  b.hidden = !message;
}

// Run an action; its failure becomes a message, never a blank page. A
// refused token sends the user back to the login.
async function guard(fn, what) {
  try {
    return await fn();
  } catch (e) {
    if (e && e.name === "AbortError") return undefined;
    if (e instanceof api.ApiError && e.status === 401) {
      logout("Your token was refused: " + e.message);
      return undefined;
    }
    toast(what ? `${what}: ${e.message}` : e.message, "error");
    return undefined;
  }
}

function busy(button, fn) {
  return async (ev) => {
    if (ev) ev.preventDefault();
    button.disabled = true;
    try {
      await fn();
    } finally {
      button.disabled = false;
    }
  };
}

// A button that asks for a second click before it acts.
function confirmButton(label, confirmLabel, action, attrs = {}) {
  let armed = null;
  const b = el("button", { type: "button", class: "danger", ...attrs }, label);
  b.addEventListener("click", async () => {
    if (!armed) {
      b.textContent = confirmLabel;
      b.classList.add("armed");
      armed = setTimeout(() => { armed = null; b.textContent = label; b.classList.remove("armed"); }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    b.textContent = label;
    b.classList.remove("armed");
    b.disabled = true;
    try { await action(); } finally { b.disabled = false; }
  });
  return b;
}

function ago(iso) {
  if (!iso) return "never";
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return iso;
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function size(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function statusBadge(status) {
  return el("span", { class: `badge status-${status || "unknown"}`, dataset: { status: status || "" } }, status || "unknown");
}

function lastActive(s) {
  return s.last_active_at || s.last_running_at || s.updated_at || s.created_at;
}

// ---------------------------------------------------------------- theme

const THEME_KEY = "den.theme";

function currentTheme() {
  const chosen = localStorage.getItem(THEME_KEY);
  if (chosen === "light" || chosen === "dark") return chosen;
  return matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

const termThemes = {
  dark: { background: "#0f1417", foreground: "#d8e0e3", cursor: "#f2c14e", selectionBackground: "#2f6f5e88" },
  light: { background: "#fbfaf7", foreground: "#1d2528", cursor: "#2f6f5e", selectionBackground: "#2f6f5e44" },
};
const themeListeners = new Set();

function applyTheme() {
  const t = currentTheme();
  document.documentElement.dataset.theme = t;
  $("#theme-toggle").textContent = t === "dark" ? "Light" : "Dark";
  for (const f of themeListeners) f(t);
}

// ---------------------------------------------------------------- session

// Shown by the next login view.
let loginMessage = "";

function logout(message) {
  api.setToken(null);
  nodesProbed = false;
  loginMessage = message || "";
  if (message) toast(message, "error");
  // The login view keeps the route the user asked for, and opens it once
  // logged in; a refused token starts again from the list.
  if (location.hash !== "#/login") location.hash = "#/login";
  else render();
}

function showLoginError(message) {
  const e = $("#login-error");
  if (e) { e.textContent = message; e.hidden = false; }
}

// ---------------------------------------------------------------- views

function loginView(view) {
  const input = el("input", { id: "login-token", type: "password", autocomplete: "off", placeholder: "den_…", required: true, spellcheck: "false" });
  const error = el("p", { id: "login-error", class: "form-error", role: "alert", hidden: true });
  const submit = el("button", { id: "login-submit", type: "submit", class: "primary" }, "Log in");
  const form = el("form", { class: "card login" },
    el("h1", {}, "den console"),
    el("p", { class: "muted" }, "Log in with a den API token. It stays in this browser tab only, and the console can do exactly what the token can."),
    el("label", { for: "login-token" }, "Token"), input, error, submit);
  form.addEventListener("submit", busy(submit, async () => {
    const t = input.value.trim();
    error.hidden = true;
    if (!api.plausibleToken(t)) { showLoginError("That is not a den token (they look like den_…)."); return; }
    api.setToken(t);
    try {
      await api.call("GET", "/v1/sprites?max_results=1");
    } catch (e) {
      api.setToken(null);
      const msg = e instanceof api.ApiError && e.status === 401 ? `Token refused: ${e.message}` : e.message;
      showLoginError(msg);
      toast(msg, "error");
      return;
    }
    // A deep link opened while logged out opens now; the login route goes to the list.
    if (!location.hash || location.hash.startsWith("#/login")) location.hash = "#/";
    else render();
  }));
  view.append(form);
  if (loginMessage) { showLoginError(loginMessage); loginMessage = ""; }
  input.focus();
}

// The one place sprite states come in. The sprite list, kept current: den's live stream of sprite changes
// (`GET /v1/sprites` as NDJSON, what the SDKs' watchSprites reads) makes
// every change refetch the list at once; the poll stays as a slow fallback
// for what a stream can miss (a reconnect, sprites of other cluster nodes).
function watchSprites(onList) {
  let stopped = false, timer = null, ctl = null, liveCtl = null, soon = null;
  async function fetchAll() {
    const all = [];
    let token = "";
    for (let page = 0; page < 20; page++) {
      ctl = new AbortController();
      const q = new URLSearchParams({ max_results: "100" });
      if (token) q.set("continuation_token", token);
      const r = await api.call("GET", `/v1/sprites?${q}`, { signal: ctl.signal });
      all.push(...(r.sprites || []));
      if (!r.has_more || !r.next_continuation_token) break;
      token = r.next_continuation_token;
    }
    return all;
  }
  async function tick() {
    clearTimeout(timer);
    await guard(async () => { const list = await fetchAll(); if (!stopped) onList(list); }, "Listing sprites");
    if (!stopped) timer = setTimeout(tick, LIST_POLL_MS);
  }
  // Changes come in bursts (wake: running; sleep: warm, then cold): one
  // refetch per burst.
  function changed() {
    if (soon || stopped) return;
    soon = setTimeout(() => { soon = null; tick(); }, 100);
  }
  async function live() {
    while (!stopped) {
      liveCtl = new AbortController();
      try {
        await api.stream("GET", "/v1/sprites", {
          accept: "application/x-ndjson",
          signal: liveCtl.signal,
          onLine: (ev) => { if (ev.type !== "heartbeat") changed(); },
        });
      } catch (_) { /* the poll carries on; reconnect below */ }
      if (!stopped) await new Promise((r) => setTimeout(r, LIVE_RETRY_MS));
    }
  }
  tick();
  live();
  return {
    refresh() { tick(); },
    stop() {
      stopped = true;
      clearTimeout(timer);
      clearTimeout(soon);
      if (ctl) ctl.abort();
      if (liveCtl) liveCtl.abort();
    },
  };
}

function spritesView(view) {
  const name = el("input", { id: "new-sprite-name", placeholder: "name (lowercase, digits, -)", pattern: "[a-z0-9][a-z0-9\\-]*", required: true, autocomplete: "off" });
  const create = el("button", { id: "create-sprite", type: "submit", class: "primary" }, "Create sprite");
  const form = el("form", { class: "inline-form" }, name, create);
  const counts = el("span", { class: "muted", id: "sprite-counts" });
  const tbody = el("tbody", { id: "sprite-rows" });
  const empty = el("p", { class: "empty", hidden: true }, "No sprites yet. Create one above.");
  const table = el("table", { class: "list" },
    el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Status"), el("th", { class: "hide-narrow" }, "URL"), el("th", {}, "Last active"), el("th", {}, ""))),
    tbody);
  view.append(
    el("section", { class: "page-head" }, el("h1", {}, "Sprites"), counts),
    el("section", { class: "card" }, form),
    el("section", { class: "card flush" }, table, empty));

  const rows = new Map();
  function row(s) {
    const r = el("tr", { dataset: { sprite: s.name } });
    const del = confirmButton("Delete", "Confirm delete", () => guard(async () => {
      await api.call("DELETE", api.spritePath(s.name));
      toast(`Deleted ${s.name}`);
      watcher.refresh();
    }, `Deleting ${s.name}`), { class: "danger small", "data-action": "delete" });
    r.append(
      el("td", {}, el("a", { href: `#/sprites/${encodeURIComponent(s.name)}/terminal`, class: "sprite-link" }, s.name)),
      el("td", { class: "status-cell" }),
      el("td", { class: "hide-narrow url-cell" }),
      el("td", { class: "active-cell muted" }),
      el("td", { class: "actions" }, del));
    return r;
  }
  function update(r, s) {
    r.querySelector(".status-cell").replaceChildren(statusBadge(s.status));
    r.querySelector(".url-cell").replaceChildren(s.url ? el("a", { href: s.url, target: "_blank", rel: "noopener noreferrer" }, s.url) : "");
    r.querySelector(".active-cell").textContent = ago(lastActive(s));
  }
  const watcher = watchSprites((list) => {
    const seen = new Set();
    for (const s of list) {
      seen.add(s.name);
      let r = rows.get(s.name);
      if (!r) { r = row(s); rows.set(s.name, r); }
      update(r, s);
    }
    for (const [n, r] of rows) if (!seen.has(n)) { r.remove(); rows.delete(n); }
    tbody.replaceChildren(...[...rows.values()].sort((a, b) => a.dataset.sprite.localeCompare(b.dataset.sprite)));
    const by = (st) => list.filter((s) => s.status === st).length;
    counts.textContent = `${list.length} total · ${by("running")} running · ${by("warm")} warm · ${by("cold")} cold`;
    empty.hidden = list.length > 0;
  });
  form.addEventListener("submit", busy(create, async () => {
    const n = name.value.trim();
    const s = await guard(() => api.call("POST", "/v1/sprites", { json: { name: n } }), `Creating ${n}`);
    if (s) {
      toast(`Created ${n}`);
      name.value = "";
      watcher.refresh();
    }
  }));
  return () => watcher.stop();
}

// ---------------------------------------------------------------- sprite page

const TABS = [
  ["terminal", "Terminal"],
  ["checkpoints", "Checkpoints"],
  ["services", "Services"],
  ["files", "Files"],
  ["network", "Network"],
  ["settings", "URL & settings"],
];

function spriteView(view, name, tab) {
  const head = el("section", { class: "page-head" },
    el("a", { href: "#/", class: "back" }, "← Sprites"),
    el("h1", { id: "sprite-name" }, name),
    el("span", { id: "sprite-status" }),
    el("span", { id: "sprite-url", class: "muted hide-narrow" }));
  const tabs = el("nav", { class: "tabs", role: "tablist" },
    TABS.map(([id, label]) => el("a", { href: `#/sprites/${encodeURIComponent(name)}/${id}`, role: "tab", id: `tab-${id}`, class: id === tab ? "active" : "", "aria-selected": String(id === tab) }, label)));
  const body = el("section", { class: "tab-body", id: `panel-${tab}` });
  view.append(head, tabs, body);

  let stopped = false, timer = null;
  async function refreshHead() {
    const s = await guard(() => api.call("GET", api.spritePath(name)));
    if (stopped) return;
    if (s) {
      $("#sprite-status").replaceChildren(statusBadge(s.status));
      $("#sprite-url").replaceChildren(s.url ? el("a", { href: s.url, target: "_blank", rel: "noopener noreferrer" }, s.url) : "");
    }
    timer = setTimeout(refreshHead, POLL_MS);
  }
  refreshHead();
  // A tab that changed the sprite's state (woke it, restored it) asks for
  // the header now rather than at the next poll.
  const onChange = () => { clearTimeout(timer); refreshHead(); };
  window.addEventListener("den:sprite-changed", onChange);
  const views = { terminal: terminalTab, checkpoints: checkpointsTab, services: servicesTab, files: filesTab, network: networkTab, settings: settingsTab };
  const cleanup = (views[tab] || terminalTab)(body, name);
  return () => { stopped = true; clearTimeout(timer); window.removeEventListener("den:sprite-changed", onChange); if (cleanup) cleanup(); };
}

function spriteChanged() {
  window.dispatchEvent(new Event("den:sprite-changed"));
}

// -- terminal

function terminalTab(body, name) {
  const host = el("div", { class: "terminal", id: "terminal" });
  const state = el("span", { class: "muted", id: "terminal-state" }, "connecting…");
  const sessions = el("ul", { class: "sessions", id: "sessions" });
  const copy = el("button", { type: "button", id: "term-copy", title: "Copy the selection (Ctrl+Shift+C)" }, "Copy");
  const paste = el("button", { type: "button", id: "term-paste", title: "Paste (Ctrl+Shift+V)" }, "Paste");
  const fresh = el("button", { type: "button", id: "term-new" }, "New shell");
  body.append(
    el("div", { class: "term-bar" }, state, el("span", { class: "spacer" }), copy, paste, fresh),
    host,
    el("details", { class: "card", id: "sessions-box" }, el("summary", {}, "Sessions in this sprite"), sessions));

  const term = new Terminal({
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace",
    fontSize: 14,
    theme: termThemes[currentTheme()],
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(host);
  const onTheme = (t) => { term.options.theme = termThemes[t]; };
  themeListeners.add(onTheme);

  let ws = null, closed = false;
  const enc = new TextEncoder();
  const send = (data) => { if (ws && ws.readyState === WebSocket.OPEN) ws.send(typeof data === "string" ? enc.encode(data) : data); };
  const sendResize = () => {
    host.dataset.cols = term.cols;
    host.dataset.rows = term.rows;
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  };

  function connect(session) {
    if (ws) { ws.onclose = null; ws.close(); }
    term.reset();
    fit.fit();
    const query = new URLSearchParams();
    if (!session) {
      for (const a of SHELL) query.append("cmd", a);
      query.set("tty", "true");
      query.set("stdin", "true");
      query.set("cols", String(term.cols));
      query.set("rows", String(term.rows));
    }
    state.textContent = session ? `attaching to session ${session}…` : "starting a shell…";
    ws = api.execSocket(name, { query: session ? "" : query.toString(), session });
    const sock = ws;
    let opened = false;
    sock.onopen = () => { opened = true; sendResize(); term.focus(); };
    sock.onmessage = (ev) => {
      if (typeof ev.data !== "string") { term.write(new Uint8Array(ev.data)); return; }
      let m;
      try { m = JSON.parse(ev.data); } catch (_) { return; }
      if (m.type === "session_info") {
        host.dataset.session = m.session_id;
        spriteChanged();
        state.textContent = `session ${m.session_id} · ${m.is_owner ? "started here" : "attached"}`;
        if (!m.is_owner) sendResize();
      } else if (m.type === "exit") {
        state.textContent = `exited with code ${m.exit_code}`;
        term.write(`\r\n\x1b[2m[exited with code ${m.exit_code}]\x1b[0m\r\n`);
      } else if (m.type === "timeout") {
        term.write(`\r\n\x1b[33m${m.message}\x1b[0m\r\n`);
      } else if (m.type === "port_opened") {
        toast(`Port ${m.port} opened in ${name}`);
      }
    };
    sock.onclose = async (ev) => {
      if (closed || sock !== ws) return;
      if (!opened) {
        // A browser hides why a handshake failed; the session list has the
        // same authorization, so its answer carries the API's reason.
        state.textContent = "could not connect";
        const ok = await guard(() => api.call("GET", api.spritePath(name, "/exec")), "Terminal");
        if (ok) toast(`Terminal: the connection failed (code ${ev.code})`, "error");
        return;
      }
      if (ev.code !== 1000) {
        state.textContent = "disconnected";
        toast(`Terminal disconnected${ev.reason ? ": " + ev.reason : ""} (code ${ev.code})`, "error");
      }
      loadSessions();
    };
    sock.onerror = () => { if (!closed && sock === ws) state.textContent = "connection failed"; };
  }

  term.onData((d) => send(d));
  term.onResize(() => sendResize());
  // Copy and paste from the keyboard like a desktop terminal (Ctrl+C stays SIGINT).
  term.attachCustomKeyEventHandler((e) => {
    if (e.type !== "keydown" || !e.ctrlKey || !e.shiftKey) return true;
    if (e.code === "KeyC") { doCopy(); return false; }
    if (e.code === "KeyV") { doPaste(); return false; }
    return true;
  });
  async function doCopy() {
    const sel = term.getSelection();
    if (!sel) { toast("Select some text in the terminal first"); return; }
    await guard(() => navigator.clipboard.writeText(sel), "Copy");
  }
  async function doPaste() {
    const text = await guard(() => navigator.clipboard.readText(), "Paste");
    if (text) term.paste(text);
  }
  copy.addEventListener("click", doCopy);
  paste.addEventListener("click", doPaste);
  fresh.addEventListener("click", () => connect(null));

  async function loadSessions() {
    const r = await guard(() => api.call("GET", api.spritePath(name, "/exec")), "Listing sessions");
    if (!r || closed) return undefined;
    const list = r.sessions || [];
    sessions.replaceChildren(...(list.length ? list.map((s) => el("li", { dataset: { session: s.id } },
      el("code", {}, s.command || "?"),
      el("span", { class: "muted" }, ` · ${s.tty ? "tty" : "no tty"} · ${s.is_active ? "attached" : "detached"} · ${ago(s.last_activity)}`),
      s.tty ? el("button", { type: "button", class: "small", "data-action": "attach", onclick: () => connect(s.id) }, "Attach") : null))
      : [el("li", { class: "muted" }, "No running sessions.")]));
    return list;
  }

  const ro = new ResizeObserver(() => { try { fit.fit(); } catch (_) { /* detached */ } });
  ro.observe(host);
  loadSessions().then((list) => {
    // Come back to this tab's last shell of this sprite, else to the newest
    // detached one, with its scrollback: TTY shells outlive the page, and a
    // new one on every visit would pile up.
    const last = sessionStorage.getItem(`den.session.${name}`);
    const live = (list || []).filter((s) => s.tty);
    const detached = live.filter((s) => !s.is_active).sort((a, b) => Date.parse(b.created) - Date.parse(a.created));
    const pick = live.some((s) => String(s.id) === last) ? last : detached.length ? String(detached[0].id) : null;
    connect(pick);
  });
  const remember = new MutationObserver(() => {
    if (host.dataset.session) sessionStorage.setItem(`den.session.${name}`, host.dataset.session);
  });
  remember.observe(host, { attributes: true, attributeFilter: ["data-session"] });

  return () => {
    closed = true;
    ro.disconnect();
    remember.disconnect();
    themeListeners.delete(onTheme);
    if (ws) { ws.onclose = null; ws.close(); }
    term.dispose();
  };
}

// -- checkpoints

function checkpointsTab(body, name) {
  const comment = el("input", { id: "checkpoint-comment", placeholder: "comment (optional)", autocomplete: "off" });
  const create = el("button", { id: "create-checkpoint", type: "submit", class: "primary" }, "Create checkpoint");
  const form = el("form", { class: "inline-form" }, comment, create);
  const progress = el("p", { class: "muted", id: "checkpoint-progress" });
  const timeline = el("ol", { class: "timeline", id: "checkpoints" });
  body.append(el("div", { class: "card" }, form, progress), el("div", { class: "card" }, timeline));

  async function load() {
    const list = await guard(() => api.call("GET", api.spritePath(name, "/checkpoints")), "Listing checkpoints");
    if (!list) return;
    list.sort((a, b) => Date.parse(b.create_time) - Date.parse(a.create_time));
    timeline.replaceChildren(...(list.length ? list.map(item) : [el("li", { class: "muted" }, "No checkpoints yet.")]));
  }
  function item(c) {
    const forkName = el("input", { placeholder: "new sprite name", class: "fork-name", autocomplete: "off" });
    const fork = el("button", { type: "button", class: "small", "data-action": "fork" }, "Fork");
    fork.addEventListener("click", busy(fork, async () => {
      const n = forkName.value.trim();
      if (!n) { toast("Name the new sprite first", "error"); forkName.focus(); return; }
      const s = await guard(() => api.call("POST", api.spritePath(name, "/fork"), { json: { name: n, checkpoint: c.id } }), `Forking ${c.id}`);
      if (s) { toast(`Forked ${c.id} into ${n}`); location.hash = `#/sprites/${encodeURIComponent(n)}/terminal`; }
    }));
    const restore = confirmButton("Restore", "Confirm restore", () => guard(async () => {
      progress.textContent = `Restoring ${c.id}…`;
      await api.stream("POST", api.spritePath(name, `/checkpoints/${encodeURIComponent(c.id)}/restore`), { onLine: (l) => { progress.textContent = l.data || ""; } });
      progress.textContent = `Restored ${c.id}`;
      spriteChanged();
      toast(`Restored ${name} to ${c.id}`);
    }, `Restoring ${c.id}`), { class: "danger small", "data-action": "restore" });
    return el("li", { dataset: { checkpoint: c.id } },
      el("div", { class: "dot" }),
      el("div", { class: "when" }, el("strong", {}, c.id), " ", el("span", { class: "muted", title: c.create_time }, ago(c.create_time))),
      c.comment ? el("div", { class: "comment" }, c.comment) : null,
      el("div", { class: "row-actions" }, restore, forkName, fork));
  }
  form.addEventListener("submit", busy(create, async () => {
    progress.textContent = "Creating checkpoint…";
    const last = await guard(() => api.stream("POST", api.spritePath(name, "/checkpoint"), {
      json: comment.value.trim() ? { comment: comment.value.trim() } : {},
      onLine: (l) => { if (l.data) progress.textContent = l.data; },
    }), "Checkpoint");
    if (last) { comment.value = ""; toast(last.data || "Checkpoint created"); }
    else progress.textContent = "";
    await load();
  }));
  load();
  return null;
}

// -- services

function servicesTab(body, name) {
  const f = {
    name: el("input", { id: "service-name", placeholder: "name", required: true, autocomplete: "off" }),
    cmd: el("input", { id: "service-cmd", placeholder: "command, e.g. /usr/bin/python3", required: true, autocomplete: "off" }),
    args: el("input", { id: "service-args", placeholder: 'arguments: a b c, or ["-c", "a script"]', autocomplete: "off" }),
    port: el("input", { id: "service-port", placeholder: "HTTP port", type: "number", min: "1", max: "65535" }),
  };
  const add = el("button", { type: "submit", class: "primary", id: "create-service" }, "Create service");
  const form = el("form", { class: "inline-form wrap" }, f.name, f.cmd, f.args, f.port, add);
  const tbody = el("tbody", { id: "service-rows" });
  const logsTitle = el("h2", {}, "Logs");
  const logs = el("pre", { class: "logs", id: "service-logs" }, "Pick a service to follow its logs.");
  const logsBox = el("div", { class: "card", id: "logs-box", hidden: true }, logsTitle, logs);
  body.append(
    el("div", { class: "card" }, form),
    el("div", { class: "card flush" }, el("table", { class: "list" },
      el("thead", {}, el("tr", {}, el("th", {}, "Service"), el("th", { class: "hide-narrow" }, "Command"), el("th", {}, "State"), el("th", {}, ""))), tbody)),
    logsBox);

  let following = null, logTimer = null, listTimer = null, stopped = false, ctl = null;
  async function load() {
    const list = await guard(() => api.call("GET", api.spritePath(name, "/services")), "Listing services");
    if (stopped) return;
    if (list) tbody.replaceChildren(...(list.length ? list.map(row) : [el("tr", {}, el("td", { colspan: "4", class: "muted" }, "No services."))]));
    listTimer = setTimeout(load, POLL_MS);
  }
  function row(s) {
    const st = (s.state && s.state.status) || "stopped";
    const act = (button, verb) => busy(button, async () => {
      await guard(() => api.stream("POST", api.spritePath(name, `/services/${encodeURIComponent(s.name)}/${verb}`)), `${verb} ${s.name}`);
      clearTimeout(listTimer);
      load();
    });
    const start = el("button", { type: "button", class: "small", "data-action": "start" }, "Start");
    const stop = el("button", { type: "button", class: "small", "data-action": "stop" }, "Stop");
    const logsBtn = el("button", { type: "button", class: "small", "data-action": "logs" }, "Logs");
    start.addEventListener("click", act(start, "start"));
    stop.addEventListener("click", act(stop, "stop"));
    logsBtn.addEventListener("click", () => follow(s.name));
    const del = confirmButton("Delete", "Confirm", () => guard(async () => {
      await api.call("DELETE", api.spritePath(name, `/services/${encodeURIComponent(s.name)}`));
      clearTimeout(listTimer);
      load();
    }, `Deleting ${s.name}`), { class: "danger small", "data-action": "delete" });
    return el("tr", { dataset: { service: s.name } },
      el("td", {}, el("strong", {}, s.name)),
      el("td", { class: "hide-narrow" }, el("code", {}, [s.cmd, ...(s.args || [])].join(" "))),
      el("td", {}, el("span", { class: `badge svc-${st}` }, st), s.state && s.state.error ? el("div", { class: "form-error" }, s.state.error) : null),
      el("td", { class: "actions" }, start, stop, logsBtn, del));
  }
  // The logs route answers the tail; polling it keeps the view live.
  async function pollLogs() {
    if (!following || stopped) return;
    const svc = following;
    ctl = new AbortController();
    const text = await guard(async () => {
      const r = await api.call("GET", api.spritePath(name, `/services/${encodeURIComponent(svc)}/logs?lines=${LOG_LINES}`), { raw: true, signal: ctl.signal });
      return r.text();
    }, `Logs of ${svc}`);
    if (stopped || following !== svc) return;
    if (text !== undefined) {
      const atEnd = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
      logs.textContent = text || "(no output yet)";
      if (atEnd) logs.scrollTop = logs.scrollHeight;
    }
    logTimer = setTimeout(pollLogs, LOG_POLL_MS);
  }
  function follow(svc) {
    following = svc;
    clearTimeout(logTimer);
    if (ctl) ctl.abort();
    logsBox.hidden = false;
    logsTitle.textContent = `Logs of ${svc}`;
    logs.dataset.service = svc;
    logs.textContent = "loading…";
    pollLogs();
  }
  form.addEventListener("submit", busy(add, async () => {
    const n = f.name.value.trim();
    const req = { cmd: f.cmd.value.trim() };
    const args = f.args.value.trim();
    if (args.startsWith("[")) {
      try { req.args = JSON.parse(args); } catch (e) { toast(`Arguments: not a JSON array: ${e.message}`, "error"); return; }
    } else if (args) req.args = args.split(/\s+/);
    if (f.port.value) req.http_port = Number(f.port.value);
    const ok = await guard(() => api.stream("PUT", api.spritePath(name, `/services/${encodeURIComponent(n)}`), { json: req }), `Creating service ${n}`);
    if (ok !== undefined) {
      toast(`Service ${n} created`);
      for (const i of Object.values(f)) i.value = "";
      clearTimeout(listTimer);
      load();
    }
  }));
  load();
  return () => { stopped = true; clearTimeout(logTimer); clearTimeout(listTimer); if (ctl) ctl.abort(); };
}

// -- files

function filesTab(body, name) {
  let cwd = sessionStorage.getItem(`den.cwd.${name}`) || "/home/sprite";
  const pathInput = el("input", { id: "files-path", value: cwd, autocomplete: "off", spellcheck: "false" });
  const go = el("button", { type: "submit" }, "Open");
  const up = el("button", { type: "button", id: "files-up" }, "Up");
  const upload = el("input", { type: "file", id: "files-upload", multiple: true });
  const uploadLabel = el("label", { class: "button", for: "files-upload" }, "Upload…");
  const nav = el("form", { class: "inline-form" }, up, pathInput, go, uploadLabel, upload);
  const tbody = el("tbody", { id: "file-rows" });
  const viewer = el("div", { class: "card", id: "file-viewer", hidden: true });
  body.append(el("div", { class: "card" }, nav),
    el("div", { class: "card flush" }, el("table", { class: "list" },
      el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Size"), el("th", { class: "hide-narrow" }, "Modified"), el("th", {}, ""))), tbody)),
    viewer);

  const join = (dir, n) => (dir.endsWith("/") ? dir : dir + "/") + n;
  const parent = (p) => p.replace(/\/+$/, "").replace(/\/[^/]*$/, "") || "/";
  const q = (p) => `path=${encodeURIComponent(p)}`;

  async function open(dir) {
    const r = await guard(() => api.call("GET", api.spritePath(name, `/fs/list?${q(dir)}`)), `Listing ${dir}`);
    if (!r) return;
    cwd = r.path || dir;
    sessionStorage.setItem(`den.cwd.${name}`, cwd);
    pathInput.value = cwd;
    const entries = (r.entries || []).slice().sort((a, b) => (b.isDir - a.isDir) || a.name.localeCompare(b.name));
    tbody.replaceChildren(...(entries.length ? entries.map(row) : [el("tr", {}, el("td", { colspan: "4", class: "muted" }, "Empty directory."))]));
  }
  function row(e) {
    const full = e.path || join(cwd, e.name);
    const link = el("a", { href: "#", class: e.isDir ? "dir" : "file" }, e.isDir ? `${e.name}/` : e.name);
    link.addEventListener("click", (ev) => { ev.preventDefault(); if (e.isDir) open(full); else view(full); });
    const dl = e.isDir ? null : el("button", { type: "button", class: "small", "data-action": "download", onclick: () => download(full, e.name) }, "Download");
    return el("tr", { dataset: { file: e.name } },
      el("td", {}, link),
      el("td", { class: "muted" }, e.isDir ? "" : size(e.size)),
      el("td", { class: "muted hide-narrow" }, ago(e.modTime)),
      el("td", { class: "actions" }, dl));
  }
  async function download(path, base) {
    const r = await guard(() => api.call("GET", api.spritePath(name, `/fs/read?${q(path)}`), { raw: true }), `Downloading ${path}`);
    if (!r) return;
    const url = URL.createObjectURL(await r.blob());
    const a = el("a", { href: url, download: base });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
  async function view(path) {
    const r = await guard(() => api.call("GET", api.spritePath(name, `/fs/read?${q(path)}&start=0&end=262144`), { raw: true }), `Reading ${path}`);
    if (!r) return;
    const text = await r.text();
    const area = el("textarea", { id: "file-content", spellcheck: "false", rows: "14" });
    area.value = text;
    const save = el("button", { type: "button", class: "primary", id: "file-save" }, "Save");
    save.addEventListener("click", busy(save, async () => {
      const ok = await guard(() => api.call("PUT", api.spritePath(name, `/fs/write?${q(path)}`), { body: area.value }), `Saving ${path}`);
      if (ok !== undefined) { toast(`Saved ${path}`); open(cwd); }
    }));
    viewer.replaceChildren(el("h2", { id: "file-viewing" }, path), area, el("div", { class: "row-actions" }, save));
    viewer.hidden = false;
  }
  nav.addEventListener("submit", (ev) => { ev.preventDefault(); open(pathInput.value.trim() || "/"); });
  up.addEventListener("click", () => open(parent(cwd)));
  upload.addEventListener("change", async () => {
    for (const file of upload.files) {
      const path = join(cwd, file.name);
      const ok = await guard(() => api.call("PUT", api.spritePath(name, `/fs/write?${q(path)}&mkdirParents=true`), { body: file }), `Uploading ${file.name}`);
      if (ok !== undefined) toast(`Uploaded ${file.name}`);
    }
    upload.value = "";
    open(cwd);
  });
  open(cwd);
  return null;
}

// -- network policy

function networkTab(body, name) {
  const rows = el("tbody", { id: "policy-rows" });
  const addDomain = el("button", { type: "button" }, "Add domain rule");
  const addDefaults = el("button", { type: "button" }, "Include defaults");
  const save = el("button", { type: "button", class: "primary", id: "policy-save" }, "Save policy");
  body.append(el("div", { class: "card" },
    el("p", { class: "muted" }, "Egress rules, most specific first: an exact host beats *.suffix, which beats *. No rules means unrestricted; a list of allowed hosts means only those."),
    el("table", { class: "list" }, el("thead", {}, el("tr", {}, el("th", {}, "Domain"), el("th", {}, "Action"), el("th", {}, ""))), rows),
    el("div", { class: "row-actions" }, addDomain, addDefaults, el("span", { class: "spacer" }), save)));

  function ruleRow(rule) {
    const remove = el("button", { type: "button", class: "small danger", onclick: () => tr.remove() }, "Remove");
    let tr;
    if (rule.include !== undefined) {
      tr = el("tr", { dataset: { include: rule.include } }, el("td", {}, el("em", {}, `include ${rule.include}`)), el("td", {}), el("td", { class: "actions" }, remove));
    } else {
      const domain = el("input", { class: "policy-domain", value: rule.domain || "", placeholder: "example.com, *.example.com or *" });
      const action = el("select", { class: "policy-action" }, el("option", { value: "allow" }, "allow"), el("option", { value: "deny" }, "deny"));
      action.value = rule.action || "allow";
      tr = el("tr", {}, el("td", {}, domain), el("td", {}, action), el("td", { class: "actions" }, remove));
    }
    return tr;
  }
  function collect() {
    return [...rows.children].map((tr) => tr.dataset.include !== undefined
      ? { include: tr.dataset.include }
      : { domain: tr.querySelector(".policy-domain").value.trim(), action: tr.querySelector(".policy-action").value });
  }
  addDomain.addEventListener("click", () => rows.append(ruleRow({ domain: "", action: "allow" })));
  addDefaults.addEventListener("click", () => rows.append(ruleRow({ include: "defaults" })));
  save.addEventListener("click", busy(save, async () => {
    const ok = await guard(() => api.call("POST", api.spritePath(name, "/policy/network"), { json: { rules: collect() } }), "Saving the policy");
    if (ok !== undefined) toast("Network policy saved");
  }));
  guard(async () => {
    const p = await api.call("GET", api.spritePath(name, "/policy/network"));
    rows.replaceChildren(...((p && p.rules) || []).map(ruleRow));
  }, "Reading the policy");
  return null;
}

// -- URL and settings

function settingsTab(body, name) {
  const auth = el("select", { id: "url-auth" },
    el("option", { value: "sprite" }, "Token required (sprite)"),
    el("option", { value: "public" }, "Public"));
  const save = el("button", { type: "button", class: "primary", id: "url-save" }, "Save");
  const url = el("p", { id: "settings-url" });
  const del = confirmButton("Delete this sprite", "Really delete it", () => guard(async () => {
    await api.call("DELETE", api.spritePath(name));
    toast(`Deleted ${name}`);
    location.hash = "#/";
  }, `Deleting ${name}`), { id: "delete-sprite" });
  body.append(
    el("div", { class: "card" }, el("h2", {}, "URL"), url,
      el("label", { for: "url-auth" }, "Who may open it"), el("div", { class: "inline-form" }, auth, save)),
    el("div", { class: "card danger-zone" }, el("h2", {}, "Delete"), el("p", { class: "muted" }, "Deletes the sprite, its disk and its checkpoints."), del));
  guard(async () => {
    const s = await api.call("GET", api.spritePath(name));
    url.replaceChildren(s.url ? el("a", { href: s.url, target: "_blank", rel: "noopener noreferrer" }, s.url) : "no URL");
    auth.value = (s.url_settings && s.url_settings.auth) || "sprite";
  });
  save.addEventListener("click", busy(save, async () => {
    const ok = await guard(() => api.call("PUT", api.spritePath(name), { json: { url_settings: { auth: auth.value } } }), "Saving the URL setting");
    if (ok !== undefined) toast(`URL is now ${auth.value === "public" ? "public" : "token-protected"}`);
  }));
  return null;
}

// ---------------------------------------------------------------- nodes

// Nodes exist in cluster mode, for the server's administrator; anything
// else (404 on a single node, 403 for a tenant, an empty list) hides it.
async function probeNodes() {
  try {
    const r = await api.call("GET", "/v1/nodes");
    $("#nav-nodes").hidden = !(r && Array.isArray(r.nodes) && r.nodes.length);
  } catch (_) {
    $("#nav-nodes").hidden = true;
  }
}

function nodesView(view) {
  const tbody = el("tbody", { id: "node-rows" });
  view.append(el("section", { class: "page-head" }, el("h1", {}, "Nodes")),
    el("section", { class: "card flush" }, el("table", { class: "list" },
      el("thead", {}, el("tr", {}, el("th", {}, "Node"), el("th", {}, "State"), el("th", {}, "Region"), el("th", { class: "hide-narrow" }, "Address"))), tbody)));
  let stopped = false, timer = null;
  async function load() {
    const r = await guard(() => api.call("GET", "/v1/nodes"), "Listing nodes");
    if (stopped) return;
    if (r) {
      tbody.replaceChildren(...(r.nodes || []).map((n) => el("tr", { dataset: { node: n.name } },
        el("td", {}, el("strong", {}, n.name)),
        el("td", {}, el("span", { class: `badge ${n.alive ? "status-running" : "status-cold"}` }, n.alive ? (n.draining ? "draining" : "alive") : "down")),
        el("td", {}, n.region || ""),
        el("td", { class: "hide-narrow muted" }, n.addr || n.address || ""))));
    }
    timer = setTimeout(load, POLL_MS);
  }
  load();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---------------------------------------------------------------- routing

let cleanup = null;
let nodesProbed = false;

async function render() {
  if (cleanup) { try { cleanup(); } catch (_) { /* already gone */ } cleanup = null; }
  banner("");
  const view = $("#view");
  view.replaceChildren();
  const loggedIn = !!api.token();
  $("#nav").hidden = !loggedIn;
  $("#logout").hidden = !loggedIn;
  const route = location.hash.replace(/^#/, "") || "/";
  if (!loggedIn) {
    loginView(view);
    return;
  }
  if (!nodesProbed) { nodesProbed = true; probeNodes(); }
  const parts = route.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.nav === (parts[0] === "nodes" ? "nodes" : "sprites"));
  try {
    if (parts[0] === "sprites" && parts[1]) cleanup = spriteView(view, parts[1], parts[2] || "terminal");
    else if (parts[0] === "nodes") cleanup = nodesView(view);
    else if (parts[0] === "login") { location.hash = "#/"; }
    else cleanup = spritesView(view);
  } catch (e) {
    banner(`This page failed to render: ${e.message}`);
  }
}

window.addEventListener("hashchange", render);
window.addEventListener("error", (e) => toast(`Unexpected error: ${e.message}`, "error"));
window.addEventListener("unhandledrejection", (e) => toast(`Unexpected error: ${e.reason && e.reason.message ? e.reason.message : e.reason}`, "error"));
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);

document.addEventListener("DOMContentLoaded", () => {
  $("#theme-toggle").addEventListener("click", () => {
    localStorage.setItem(THEME_KEY, currentTheme() === "dark" ? "light" : "dark");
    applyTheme();
  });
  $("#logout").addEventListener("click", () => logout());
  applyTheme();
  render();
});
