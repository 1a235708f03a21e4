// The console's only way to the server: the public /v1 API with the user's
// token, exactly as any other client calls it. The token lives in
// sessionStorage (this tab, until it closes), never in a cookie, so no other
// site can make the browser use it.

const TOKEN_KEY = "den.token";

// den's WebSocket subprotocols: the server selects WS_PROTOCOL; the token
// rides in the second one because a browser can't set Authorization on a
// WebSocket (see docs/security.md).
const WS_PROTOCOL = "den.v1";
const WS_TOKEN_PREFIX = "den.bearer.";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(t) {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

// The error of a failed response, in the Sprites shape
// {"error": code, "message": text}, or the plain text some routes answer.
async function failure(resp) {
  const text = await resp.text().catch(() => "");
  let code = "", message = text.trim();
  try {
    const v = JSON.parse(text);
    if (v && typeof v === "object") {
      code = v.error || "";
      message = v.message || (Array.isArray(v.errors) ? v.errors.map((e) => e.message || e).join("; ") : "") || v.error || message;
    }
  } catch (_) { /* plain text */ }
  return new ApiError(resp.status, code, message || `${resp.status} ${resp.statusText}`);
}

export function spritePath(name, rest = "") {
  return `/v1/sprites/${encodeURIComponent(name)}${rest}`;
}

// One API call. `json` sends a JSON body; `body` a raw one. Answers the
// Response (for `raw`), the parsed JSON, or null for an empty body.
export async function call(method, path, { json, body, raw, signal, accept } = {}) {
  const headers = { Authorization: `Bearer ${token() || ""}` };
  if (accept) headers.Accept = accept;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", `can't reach den: ${e.message}`);
  }
  if (!resp.ok) throw await failure(resp);
  if (raw) return resp;
  const text = await resp.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (_) {
    return text;
  }
}

// A call that answers NDJSON progress (checkpoint, restore, services):
// each line goes to `onLine`; an `error` line fails the call.
export async function stream(method, path, { json, onLine, signal, accept } = {}) {
  const resp = await call(method, path, { json, raw: true, signal, accept });
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "", last = null;
  const take = (line) => {
    if (!line.trim()) return;
    let v;
    try { v = JSON.parse(line); } catch (_) { return; }
    last = v;
    if (v.type === "error") throw new ApiError(resp.status, "error", v.error || v.message || v.data || "failed");
    if (onLine) onLine(v);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      take(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  }
  take(buf);
  return last;
}

// The exec WebSocket of a sprite: `query` is the URLSearchParams of the
// exec route (cmd, tty, cols, rows…), or `session` attaches to one.
export function execSocket(name, { query, session } = {}) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const path = session ? spritePath(name, `/exec/${encodeURIComponent(session)}`) : spritePath(name, "/exec");
  const qs = query ? `?${query}` : "";
  const ws = new WebSocket(`${scheme}//${location.host}${path}${qs}`, [WS_PROTOCOL, WS_TOKEN_PREFIX + (token() || "")]);
  ws.binaryType = "arraybuffer";
  return ws;
}

// den tokens are `den_<hex>`; anything else can't be valid and could not
// travel as a WebSocket subprotocol.
export function plausibleToken(t) {
  return /^[A-Za-z0-9._~-]+$/.test(t);
}
