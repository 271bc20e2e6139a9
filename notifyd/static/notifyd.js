/**
 * notifyd.js: the browser client for notifyd (wire protocol v1).
 *
 * A dependency-free ES module; no build step. notifyd serves it at
 * `/notifyd.js`, so a page imports it straight from the daemon:
 *
 *     import { createClient } from "https://push.example.com/notifyd.js";
 *     const client = createClient({ token: () => fetchToken() });
 *     client.on("message", (message) => show(message));
 *
 * What it does for the page:
 *
 * - authenticates with the first frame (the token never goes into a URL,
 *   unless `tokenInUrl: true`), asking the token function for a fresh token
 *   at every (re)connect, and again before the token expires, to extend the
 *   open session in place (the server closes it with 4401 at `exp`);
 * - reconnects after any drop, with exponential backoff and full jitter
 *   (capped), and resumes from the last cursor it stored, so the page misses
 *   no message and sees none twice (message ids are also remembered in a
 *   bounded set, as a second line of defence);
 * - keeps that cursor across page reloads (sessionStorage, or the caller's
 *   store);
 * - turns `resync` and `hello.recovered === false` into one `resync` event:
 *   the page reloads its list;
 * - keeps the unread counts, in total and per message type (`counts`), from
 *   hello, unread events and the message frames that carry them (it asks
 *   for those with `counts=inline`: one frame per new message);
 * - shares one WebSocket between the tabs of an origin: the tab holding a
 *   Web Lock is the leader and owns the socket; the others get every frame
 *   relayed over a BroadcastChannel and send their actions through it. When
 *   the leader tab closes, its lock is released and another tab takes over,
 *   resuming from the cursor it was relayed.
 *
 * See docs/client.md for the API and docs/protocol.md for the wire protocol.
 */

export const PROTOCOL_VERSION = 1;

const EVENTS = new Set(["message", "unread", "read", "deleted", "resync", "state", "hello", "error"]);

const TERMINAL = new Set(["replaced", "unauthorized", "closed"]);

export const DEFAULTS = Object.freeze({
  tokenInUrl: false,
  share: true,
  initialDelayMs: 500,
  maxDelayMs: 30_000,
  restartDelayMs: 2_000,
  restartRetryMs: 1_000,
  restartRetryForMs: 60_000,
  stableAfterMs: 10_000,
  maxUnauthorized: 3,
  requestTimeoutMs: 15_000,
  helloTimeoutMs: 20_000,
  pingIntervalMs: 25_000,
  pongTimeoutMs: 10_000,
  refreshBeforeMs: 60_000,
  dedupeSize: 1_000,
  relayLogSize: 500,
});

// One `read`, `unread` or `delete` frame carries at most this many ids, and
// about this many bytes, well under the server's limits (1000 ids, 64 KiB
// per frame).
const ID_CHUNK_IDS = 500;
const ID_CHUNK_BYTES = 16 * 1024;
// Frames from other tabs waiting for the leader's socket.
const REMOTE_QUEUE_LIMIT = 500;

/** An error a request Promise rejects with; `code` says why. */
export class NotifydError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "NotifydError";
    this.code = code;
  }
}

// The `exp` claim (unix seconds) of a JWT, or null when it has none; the
// client only schedules a refresh with it, the server does the checking.
function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "="))).exp;
    return Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/** Create a client and start connecting. */
export function createClient(options) {
  return new NotifydClient(options);
}

function defaultUrl() {
  // Served by notifyd itself: connect back to the daemon the module came from.
  const here = new URL(import.meta.url);
  if (here.protocol !== "http:" && here.protocol !== "https:") {
    throw new TypeError("notifyd: pass options.url (the ws:// or wss:// push endpoint)");
  }
  return `${here.protocol === "https:" ? "wss:" : "ws:"}//${here.host}/ws/message`;
}

// The push endpoint's URL asking for unread counts on message frames
// (`counts=inline`, docs/protocol.md).
function withInlineCounts(url) {
  try {
    const parsed = new URL(url);
    parsed.searchParams.set("counts", "inline");
    return parsed.href;
  } catch {
    return `${url}${url.includes("?") ? "&" : "?"}counts=inline`; // a relative URL
  }
}

function memoryStore() {
  const values = new Map();
  return {
    get: (key) => (values.has(key) ? values.get(key) : null),
    set: (key, value) => void values.set(key, value),
    remove: (key) => void values.delete(key),
  };
}

function sessionStore() {
  try {
    const storage = globalThis.sessionStorage;
    const probe = "notifyd.probe";
    storage.setItem(probe, "1");
    storage.removeItem(probe);
    return {
      get: (key) => storage.getItem(key),
      set: (key, value) => storage.setItem(key, value),
      remove: (key) => storage.removeItem(key),
    };
  } catch {
    // Storage disabled (sandboxed frame, privacy mode): remember in memory.
    return memoryStore();
  }
}

function randomId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

function report(error) {
  // A throwing event handler must not break the client; surface it anyway.
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}

function isFrame(value) {
  return Boolean(value) && typeof value === "object" && typeof value.event === "string";
}

function sameCounts(a, b) {
  const keys = Object.keys(a);
  return keys.length === Object.keys(b).length && keys.every((key) => a[key] === b[key]);
}

function chunkIds(ids) {
  const chunks = [];
  let chunk = [];
  let bytes = 0;
  for (const id of ids) {
    const size = id.length * 3 + 4;
    if (chunk.length && (chunk.length >= ID_CHUNK_IDS || bytes + size > ID_CHUNK_BYTES)) {
      chunks.push(chunk);
      chunk = [];
      bytes = 0;
    }
    chunk.push(id);
    bytes += size;
  }
  if (chunk.length) chunks.push(chunk);
  return chunks;
}

export class NotifydClient {
  #options;
  #url;
  #tokenProvider;
  #WebSocket;
  #store;
  #storeKey;
  #shareKey;
  #tabId = randomId();
  #handlers = new Map();

  #state = "idle";
  #role = "solo";
  #cursor = null;
  #unread = null;
  #counts = null;
  #user = null;
  #gap = false;
  #seen = new Set();
  #relayLog = [];
  #pending = new Map();
  #requestSeq = 0;
  #closed = false;

  // The socket side (solo or leader).
  #ws = null;
  #helloed = false;
  #openedAt = 0;
  #attempt = 0;
  #upgraded = false;
  #restartedAt = 0;
  #unauthorized = 0;
  #connectSeq = 0;
  #retryTimer = null;
  #helloTimer = null;
  #pingTimer = null;
  #pongTimer = null;
  #refreshTimer = null;
  #tokenExp = null;
  #remoteQueue = [];

  // Tab sharing.
  #channel = null;
  #leaderId = null;
  #lockAbort = null;
  #releaseLock = null;

  #onOnline = () => this.#retryNow();

  /**
   * @param {object} options see notifyd.d.ts (`ClientOptions`)
   */
  constructor(options = {}) {
    const { token } = options;
    if (typeof token !== "function" && (typeof token !== "string" || !token)) {
      throw new TypeError("notifyd: options.token must be a function that returns a token");
    }
    this.#options = { ...DEFAULTS, ...options };
    this.#url = options.url ? String(options.url) : defaultUrl();
    this.#tokenProvider = typeof token === "function" ? token : () => token;
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#shareKey = String(options.shareKey ?? this.#url);
    this.#store = options.store === undefined ? sessionStore() : (options.store ?? memoryStore());
    this.#storeKey = options.storeKey ?? `notifyd.cursor:${this.#shareKey}`;
    this.#cursor = this.#storeGet() || null;
    globalThis.addEventListener?.("online", this.#onOnline);
    const canShare =
      this.#options.share !== false &&
      typeof globalThis.BroadcastChannel === "function" &&
      typeof globalThis.navigator?.locks?.request === "function";
    // Start after the caller's synchronous code, so its handlers see every event.
    queueMicrotask(() => {
      if (this.#closed) return;
      if (canShare) this.#startShared();
      else this.#connect();
    });
  }

  // -- public surface ----------------------------------------------------

  /** "connecting" | "open" | "reconnecting" | "replaced" | "unauthorized" | "closed" (and "idle" before start). */
  get state() { return this.#state; }
  /** "solo" (own socket), "leader" (own socket, shared) or "follower" (another tab's socket). */
  get role() { return this.#role; }
  /** The last stored resume cursor, or null. */
  get cursor() { return this.#cursor; }
  /** The last known unread count, or null before the first hello. */
  get unread() { return this.#unread; }
  /**
   * The last known unread counts, `{ total, byType }` (frozen), or null before
   * the first hello. `byType` maps a type to its unread count ("" for messages
   * without a type), leaves out types with none, and is `{}` when the server
   * sends no per-type counts (servers before they existed).
   */
  get counts() { return this.#counts; }
  /** The authenticated user id from hello, or null. */
  get user() { return this.#user; }

  /** Subscribe; returns a function that unsubscribes. */
  on(name, handler) {
    if (!EVENTS.has(name)) throw new TypeError(`notifyd: unknown event ${name}`);
    if (typeof handler !== "function") throw new TypeError("notifyd: handler must be a function");
    let handlers = this.#handlers.get(name);
    if (!handlers) this.#handlers.set(name, (handlers = new Set()));
    handlers.add(handler);
    return () => this.off(name, handler);
  }

  off(name, handler) {
    this.#handlers.get(name)?.delete(handler);
  }

  /** Mark messages read; resolves once the request is on its way to the server. */
  markRead(ids) {
    return this.#sendIds("read", ids);
  }

  /** Mark every unread message (of `type`, when given) read. */
  markAllRead(type) {
    const frame = { action: "read_all" };
    if (type != null) frame.type = String(type);
    return this.#request(frame, false);
  }

  /**
   * Mark messages unread again; resolves once sent. A `read` event with
   * `isRead: "0"` and the new counts follow on every tab and session.
   */
  markUnread(ids) {
    return this.#sendIds("unread", ids);
  }

  /**
   * Remove messages from this user's inbox (an announcement for this user
   * only); resolves once sent. A `deleted` event, and the new counts when
   * they change, follow on every tab and session.
   */
  delete(ids) {
    return this.#sendIds("delete", ids);
  }

  /** Page back through the inbox, newest first: resolves to `{ messages, more }`. */
  history({ before = null, limit = 20, type = null, unreadOnly = false } = {}) {
    const cursor = before && typeof before === "object" ? before.cursor : before;
    const frame = {
      action: "history",
      before: cursor ?? null,
      limit,
      type: type ?? null,
      unread_only: Boolean(unreadOnly),
    };
    return this.#request(frame, true).then((answer) => ({
      messages: Array.isArray(answer.messages) ? answer.messages : [],
      more: Boolean(answer.more),
    }));
  }

  /**
   * Send a client frame the methods above do not cover (`{ action, ... }`), such
   * as the demo's `demo_send`; resolves once sent. An error answer arrives as
   * an `error` event.
   */
  send(frame) {
    if (!frame || typeof frame !== "object" || typeof frame.action !== "string") {
      return Promise.reject(new TypeError("notifyd: send() needs a frame with an action"));
    }
    const { id, ...rest } = frame; // replies to an id would find no request
    return this.#request(rest, false);
  }

  /** Connect again now: after "unauthorized" (say, once the user logged in again) or to skip a backoff wait. */
  reconnect() {
    if (this.#closed) return;
    if (this.#role === "follower") {
      this.#post({ t: "reconnect", from: this.#tabId });
      return;
    }
    this.#unauthorized = 0;
    this.#attempt = 0;
    if (TERMINAL.has(this.#state)) this.#state = "idle";
    this.#retryNow();
  }

  /** Close for good: the socket (another tab takes over when shared), pending requests, timers. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    globalThis.removeEventListener?.("online", this.#onOnline);
    this.#clearSocketTimers();
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(1000, "bye"); } catch { /* already closed */ }
    }
    this.#failPending(() => true, "closed", "the client was closed");
    if (this.#role === "leader") this.#post({ t: "resign", from: this.#tabId });
    this.#lockAbort?.abort();
    this.#releaseLock?.();
    this.#channel?.close();
    this.#channel = null;
    this.#setState("closed");
  }

  // -- events and state --------------------------------------------------

  #emit(name, value) {
    const handlers = this.#handlers.get(name);
    if (!handlers) return;
    for (const handler of [...handlers]) {
      try {
        handler(value);
      } catch (error) {
        report(error);
      }
    }
  }

  #setState(state, detail = {}) {
    const previous = this.#state;
    if (state === previous && state !== "reconnecting") return;
    this.#state = state;
    if (this.#role === "leader") this.#post({ t: "state", state, detail });
    this.#emit("state", { ...detail, state, previous, role: this.#role });
  }

  #storeGet() {
    try {
      return this.#store.get(this.#storeKey);
    } catch {
      return null;
    }
  }

  #saveCursor(cursor) {
    if (typeof cursor !== "string" || !cursor) return;
    this.#cursor = cursor;
    try {
      this.#store.set(this.#storeKey, cursor);
    } catch {
      // Quota or disabled storage: the in-memory cursor still resumes this page.
    }
  }

  #remember(id) {
    if (this.#seen.has(id)) return false;
    this.#seen.add(id);
    if (this.#seen.size > this.#options.dedupeSize) {
      this.#seen.delete(this.#seen.values().next().value);
    }
    return true;
  }

  #log(frame) {
    // Every tab keeps the recent cursor-bearing frames, so whichever becomes
    // leader can catch up a tab that reloads.
    this.#relayLog.push(frame);
    if (this.#relayLog.length > this.#options.relayLogSize) this.#relayLog.shift();
  }

  // One server frame, from this tab's socket or relayed by the leader.
  #handleFrame(frame) {
    switch (frame.event) {
      case "hello":
        this.#log(frame);
        this.#saveCursor(frame.cursor);
        this.#user = frame.user ?? null;
        // recovered: false is always followed by a resync frame (after the
        // kept part of the replay): the one resync event fires there.
        this.#gap = frame.recovered === false;
        this.#emit("hello", { user: this.#user, unread: frame.unread, recovered: frame.recovered, cursor: frame.cursor });
        this.#setCounts(frame.unread, frame.unreadByType);
        return;
      case "message":
        this.#log(frame);
        this.#saveCursor(frame.cursor);
        if (frame.id == null || this.#remember(String(frame.id))) {
          // The counts a message frame may carry are those after it: in place
          // before the page's handler runs, announced after it.
          const changed = this.#updateCounts(frame.unread, frame.unreadByType);
          this.#emit("message", frame);
          if (changed) this.#emitUnread();
        }
        return;
      case "resync":
        this.#log(frame);
        this.#saveCursor(frame.cursor);
        this.#gap = false;
        this.#emit("resync", { cursor: frame.cursor ?? null });
        return;
      default:
        break;
    }
    if (this.#gap) {
      // A server that said recovered: false but sent no resync: still reload.
      this.#gap = false;
      this.#emit("resync", { cursor: this.#cursor });
    }
    switch (frame.event) {
      case "unread":
        this.#setCounts(frame.count, frame.byType);
        return;
      case "read": {
        const { event, ...read } = frame;
        this.#emit("read", read);
        return;
      }
      case "deleted":
        this.#emit("deleted", { ids: Array.isArray(frame.ids) ? frame.ids : [] });
        return;
      case "history": {
        const entry = frame.id != null ? this.#pending.get(String(frame.id)) : null;
        if (entry) this.#settle(entry, null, frame);
        return;
      }
      case "error": {
        const entry = frame.id != null ? this.#pending.get(String(frame.id)) : null;
        const error = new NotifydError(frame.code ?? "error", frame.message ?? "request failed");
        if (entry) this.#settle(entry, error);
        else if (frame.id == null) this.#emit("error", { code: error.code, message: error.message });
        return;
      }
      default:
        return; // pong and future events
    }
  }

  // Hello, unread events and a joining tab's sync: always announced, as
  // before per-type counts existed.
  #setCounts(total, byType) {
    if (typeof total !== "number") return;
    this.#updateCounts(total, byType);
    this.#emitUnread();
  }

  // Store new counts; whether they differ from the known ones. A frame
  // without a numeric total carries no counts and changes nothing.
  #updateCounts(total, byType) {
    if (typeof total !== "number" || !Number.isFinite(total)) return false;
    const types = {};
    if (byType && typeof byType === "object" && !Array.isArray(byType)) {
      for (const [type, count] of Object.entries(byType)) {
        if (typeof count === "number" && Number.isFinite(count) && count > 0) types[type] = count;
      }
    }
    const previous = this.#counts;
    this.#unread = total;
    this.#counts = Object.freeze({ total, byType: Object.freeze(types) });
    return !previous || previous.total !== total || !sameCounts(previous.byType, types);
  }

  #emitUnread() {
    const { total, byType } = this.#counts;
    this.#emit("unread", { count: total, byType });
  }

  // -- requests ----------------------------------------------------------

  // `read`, `unread` and `delete` take one id or an iterable of them: sent
  // deduplicated, in as many frames as the server's limits ask for.
  #sendIds(action, ids) {
    const list = typeof ids === "string" ? [ids] : Array.from(ids ?? [], (id) => String(id));
    const unique = [...new Set(list.filter((id) => id))];
    if (!unique.length) return Promise.resolve();
    return Promise.all(chunkIds(unique).map((chunk) => this.#request({ action, ids: chunk }, false)))
      .then(() => undefined);
  }

  #request(frame, expectsReply) {
    if (this.#closed || TERMINAL.has(this.#state)) {
      const code = this.#closed ? "closed" : this.#state;
      return Promise.reject(new NotifydError(code, `notifyd client is ${code}`));
    }
    const id = `${this.#tabId}.${++this.#requestSeq}`;
    if (expectsReply) frame.id = id;
    return new Promise((resolve, reject) => {
      const entry = { id, frame, expectsReply, resolve, reject, sent: false, timer: null };
      entry.timer = setTimeout(
        () => this.#settle(entry, new NotifydError("timeout", `no answer within ${this.#options.requestTimeoutMs} ms`)),
        this.#options.requestTimeoutMs,
      );
      this.#pending.set(id, entry);
      this.#dispatch(entry);
    });
  }

  #dispatch(entry) {
    if (this.#role === "follower") {
      this.#post({ t: "send", from: this.#tabId, ref: entry.id, frame: entry.frame });
    } else if (this.#helloed && this.#wsSend(entry.frame)) {
      this.#markSent(entry);
    }
    // Otherwise it waits for the next hello (or a leader to take it).
  }

  #markSent(entry) {
    entry.sent = true;
    if (!entry.expectsReply) this.#settle(entry, null, undefined);
  }

  #settle(entry, error, value) {
    if (this.#pending.get(entry.id) !== entry) return;
    this.#pending.delete(entry.id);
    clearTimeout(entry.timer);
    if (error) entry.reject(error);
    else entry.resolve(value);
  }

  #failPending(predicate, code, message) {
    for (const entry of [...this.#pending.values()]) {
      if (predicate(entry)) this.#settle(entry, new NotifydError(code, message));
    }
  }

  // Requests sent on a connection that went away will not be answered.
  #failSent() {
    this.#failPending((entry) => entry.sent && entry.expectsReply, "disconnected", "the connection closed before the answer");
  }

  // -- the socket (solo or leader) ---------------------------------------

  async #connect() {
    if (this.#closed || this.#ws || this.#role === "follower" || TERMINAL.has(this.#state)) return;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const attempt = ++this.#connectSeq;
    this.#setState("connecting");
    // One deadline from here to hello: a token function or a server that
    // never answers does not leave the client "connecting" forever.
    clearTimeout(this.#helloTimer);
    this.#helloTimer = setTimeout(() => this.#connectTimedOut(attempt), this.#options.helloTimeoutMs);
    let token;
    try {
      token = await this.#tokenProvider();
      if (typeof token !== "string" || !token) throw new TypeError("the token function returned no token");
    } catch (error) {
      if (attempt !== this.#connectSeq || this.#closed) return;
      this.#clearSocketTimers();
      this.#emit("error", { code: "token", message: String(error?.message ?? error), error });
      this.#scheduleReconnect(this.#nextDelay(), { reason: "token" });
      return;
    }
    if (attempt !== this.#connectSeq || this.#closed || this.#ws || this.#role === "follower") return;
    this.#tokenExp = tokenExpiry(token);
    // A new message's counts then travel on its own frame: one frame per
    // message. A server from before that ignores the parameter and sends
    // unread events, which are handled all the same.
    let url = withInlineCounts(this.#url);
    if (this.#options.tokenInUrl) {
      const withToken = new URL(url);
      withToken.searchParams.set("token", token);
      if (this.#cursor) withToken.searchParams.set("since", this.#cursor);
      url = withToken.href;
    }
    let ws;
    try {
      ws = new this.#WebSocket(url);
    } catch (error) {
      this.#clearSocketTimers();
      this.#emit("error", { code: "connect", message: String(error?.message ?? error), error });
      this.#scheduleReconnect(this.#nextDelay(), { reason: "connect" });
      return;
    }
    this.#ws = ws;
    this.#helloed = false;
    this.#upgraded = false;
    this.#openedAt = 0;
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      this.#upgraded = true;
      if (this.#options.tokenInUrl) return;
      const auth = { action: "auth", token };
      if (this.#cursor) auth.since = this.#cursor;
      try { ws.send(JSON.stringify(auth)); } catch { /* onclose follows */ }
    };
    ws.onmessage = (event) => this.#onSocketMessage(ws, event.data);
    ws.onclose = (event) => this.#onSocketClose(ws, event.code, event.reason);
  }

  #connectTimedOut(attempt) {
    this.#helloTimer = null;
    if (attempt !== this.#connectSeq || this.#helloed || this.#closed) return;
    if (this.#ws) {
      this.#abandon(this.#ws, "no hello in time");
      return;
    }
    this.#connectSeq += 1; // the token function's late answer is dropped
    this.#emit("error", { code: "token", message: "the token function did not answer in time" });
    this.#scheduleReconnect(this.#nextDelay(), { reason: "token" });
  }

  #onSocketMessage(ws, data) {
    if (ws !== this.#ws) return;
    clearTimeout(this.#pongTimer); // any frame proves the connection is alive
    this.#pongTimer = null;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (!isFrame(frame) || frame.event === "pong") return;
    if (frame.event === "refreshed") {
      // This socket's own business: the session now lasts until `expires`.
      this.#scheduleRefresh(ws, frame.expires);
      return;
    }
    // Answers to this tab's own requests concern no other tab.
    const own = typeof frame.id === "string" && frame.id.startsWith(`${this.#tabId}.`);
    if (this.#role === "leader" && !own) this.#post({ t: "frame", frame });
    this.#handleFrame(frame);
    if (frame.event === "hello") this.#onOpen(ws);
  }

  #onOpen(ws) {
    clearTimeout(this.#helloTimer);
    this.#helloTimer = null;
    this.#helloed = true;
    this.#openedAt = Date.now();
    this.#restartedAt = 0;
    this.#unauthorized = 0;
    this.#setState("open");
    this.#pingTimer = setInterval(() => {
      if (ws !== this.#ws || this.#pongTimer) return;
      this.#wsSend({ action: "ping" });
      this.#pongTimer = setTimeout(() => this.#abandon(ws, "no pong in time"), this.#options.pongTimeoutMs);
    }, this.#options.pingIntervalMs);
    this.#scheduleRefresh(ws, this.#tokenExp);
    this.#flush();
  }

  // Ask for a new token `refreshBeforeMs` before `exp` (halfway for tokens
  // shorter than that) and send it as a refresh on the open socket.
  #scheduleRefresh(ws, exp) {
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    if (!this.#options.refreshBeforeMs || !Number.isFinite(exp)) return;
    const remaining = exp * 1000 - Date.now();
    const delay = Math.max(remaining / 2, remaining - this.#options.refreshBeforeMs, 0);
    this.#refreshTimer = setTimeout(() => this.#refresh(ws), delay);
  }

  async #refresh(ws) {
    this.#refreshTimer = null;
    if (ws !== this.#ws) return;
    let token;
    try {
      token = await this.#tokenProvider();
      if (typeof token !== "string" || !token) throw new TypeError("the token function returned no token");
    } catch (error) {
      // The session ends with 4401 at expiry and reconnects with a new token.
      this.#emit("error", { code: "token", message: String(error?.message ?? error), error });
      return;
    }
    if (ws === this.#ws) this.#wsSend({ action: "refresh", token });
  }

  #flush() {
    for (const entry of [...this.#pending.values()]) {
      if (!entry.sent && this.#pending.has(entry.id)) {
        if (!this.#wsSend(entry.frame)) return;
        this.#markSent(entry);
      }
    }
    const now = Date.now();
    const queued = this.#remoteQueue;
    this.#remoteQueue = [];
    for (const item of queued) {
      if (item.deadline < now) continue;
      if (!this.#wsSend(item.frame)) {
        this.#remoteQueue.push(item);
        continue;
      }
      this.#post({ t: "ack", to: item.from, ref: item.ref });
    }
  }

  #wsSend(frame) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  #clearSocketTimers() {
    clearTimeout(this.#helloTimer);
    clearInterval(this.#pingTimer);
    clearTimeout(this.#pongTimer);
    clearTimeout(this.#refreshTimer);
    this.#helloTimer = this.#pingTimer = this.#pongTimer = this.#refreshTimer = null;
  }

  // Give up on a socket that stopped answering, without waiting for TCP.
  #abandon(ws, reason) {
    if (ws !== this.#ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    this.#onSocketClose(ws, 1006, reason);
    try { ws.close(); } catch { /* already closed */ }
  }

  #onSocketClose(ws, code, reason) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    this.#clearSocketTimers();
    this.#helloed = false;
    this.#failSent();
    if (this.#closed) return;
    const detail = { code, reason: reason || undefined };
    if (code === 4409) {
      this.#terminate("replaced", detail);
      return;
    }
    if (code === 4401 && ++this.#unauthorized >= this.#options.maxUnauthorized) {
      this.#terminate("unauthorized", detail);
      return;
    }
    if (code === 1012) {
      // The server is restarting: everyone reconnects at once unless spread.
      this.#attempt = 0;
      this.#openedAt = 0;
      this.#restartedAt = Date.now();
      this.#scheduleReconnect(Math.random() * this.#options.restartDelayMs, detail);
      return;
    }
    if (!this.#upgraded && this.#restartedAt && Date.now() - this.#restartedAt < this.#options.restartRetryForMs) {
      // Nothing accepts yet while the restarted server's successor starts: a
      // refused attempt costs next to nothing, and a growing backoff would
      // bring the session back long after it listens.
      this.#scheduleReconnect(this.#options.restartRetryMs * (0.5 + Math.random()), detail);
      return;
    }
    if (code === 1013) {
      // The server is shedding handshakes: wait at least its hint, plus the
      // jittered backoff, which keeps growing while it keeps shedding.
      const hint = Number(/retry_ms=(\d+)/.exec(reason || "")?.[1] ?? 0);
      this.#scheduleReconnect(hint + this.#nextDelay(), detail);
      return;
    }
    // 4401 (a fresh token is asked for), 1006, 1011, 4429, 4408, 1008, ...
    this.#scheduleReconnect(this.#nextDelay(), detail);
  }

  #terminate(state, detail) {
    this.#setState(state, detail);
    this.#failPending(() => true, state, `notifyd client is ${state}`);
  }

  #nextDelay() {
    // A session that stayed up a while starts the backoff over; one that
    // drops right after hello keeps growing it.
    if (this.#openedAt && Date.now() - this.#openedAt >= this.#options.stableAfterMs) this.#attempt = 0;
    this.#openedAt = 0;
    this.#attempt += 1;
    const cap = Math.min(this.#options.maxDelayMs, this.#options.initialDelayMs * 2 ** (this.#attempt - 1));
    return Math.random() * cap; // full jitter
  }

  #scheduleReconnect(delay, detail = {}) {
    clearTimeout(this.#retryTimer);
    this.#setState("reconnecting", { ...detail, delay: Math.round(delay), attempt: this.#attempt });
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      this.#connect();
    }, delay);
  }

  #retryNow() {
    if (this.#closed || this.#role === "follower" || this.#ws) return;
    if (this.#retryTimer || this.#state === "idle") {
      clearTimeout(this.#retryTimer);
      this.#retryTimer = null;
      this.#connect();
    }
  }

  // -- sharing between tabs ----------------------------------------------

  #startShared() {
    const name = `notifyd:v1:${this.#shareKey}`;
    this.#role = "follower";
    this.#channel = new BroadcastChannel(name);
    this.#channel.onmessage = (event) => this.#onChannel(event.data);
    this.#lockAbort = new AbortController();
    this.#setState("connecting");
    this.#post({ t: "join", from: this.#tabId, cursor: this.#cursor });
    globalThis.navigator.locks
      .request(name, { signal: this.#lockAbort.signal }, () => {
        if (this.#closed) return undefined;
        // Held until close() or until this document goes away.
        return new Promise((release) => {
          this.#releaseLock = release;
          this.#becomeLeader();
        });
      })
      .catch(() => { /* aborted by close() */ });
  }

  #post(message) {
    try {
      this.#channel?.postMessage(message);
    } catch {
      // Channel closed: nothing to relay to.
    }
  }

  #becomeLeader() {
    this.#role = "leader";
    this.#leaderId = this.#tabId;
    // Answers to requests the previous leader had sent are lost with it;
    // the unsent ones go out on this tab's socket.
    this.#failSent();
    this.#post({ t: "leader", from: this.#tabId });
    this.#connect();
  }

  #onChannel(message) {
    if (this.#closed || !message || typeof message !== "object") return;
    const leader = this.#role === "leader";
    switch (message.t) {
      case "join":
        if (leader) this.#post(this.#syncFor(message.from, message.cursor));
        return;
      case "send":
        if (leader) this.#sendFor(message);
        return;
      case "reconnect":
        if (leader) this.reconnect();
        return;
      default:
        break;
    }
    if (leader) return;
    switch (message.t) {
      case "frame":
        if (isFrame(message.frame)) this.#handleFrame(message.frame);
        return;
      case "state":
        this.#followState(message.state, message.detail);
        return;
      case "sync":
        if (message.to !== this.#tabId) return;
        this.#leaderId = message.from;
        for (const frame of Array.isArray(message.frames) ? message.frames : []) {
          if (isFrame(frame)) this.#handleFrame(frame);
        }
        if (message.resync !== undefined) this.#handleFrame({ event: "resync", cursor: message.resync });
        if (message.user) this.#user = message.user;
        if (message.counts && typeof message.counts === "object") {
          this.#setCounts(message.counts.total, message.counts.byType);
        } else if (typeof message.unread === "number") {
          this.#setCounts(message.unread, null); // a leader from before per-type counts
        }
        this.#followState(message.state, message.detail);
        return;
      case "ack": {
        const entry = message.to === this.#tabId ? this.#pending.get(message.ref) : null;
        if (entry) this.#markSent(entry);
        return;
      }
      case "leader":
        if (message.from === this.#leaderId) return;
        this.#leaderId = message.from;
        this.#failSent();
        for (const entry of this.#pending.values()) {
          if (!entry.sent) this.#post({ t: "send", from: this.#tabId, ref: entry.id, frame: entry.frame });
        }
        this.#post({ t: "join", from: this.#tabId, cursor: this.#cursor });
        return;
      case "resign":
        if (message.from === this.#leaderId) {
          this.#leaderId = null;
          this.#followState("connecting", {});
        }
        return;
      default:
        return;
    }
  }

  #followState(state, detail) {
    if (typeof state !== "string" || state === "idle") return;
    if (state !== "open") this.#failSent();
    if (TERMINAL.has(state)) this.#failPending(() => true, state, `notifyd client is ${state}`);
    this.#setState(state, detail ?? {});
  }

  // What a joining tab missed since its cursor (a reloaded tab), or a resync
  // when that cursor is not in the recent log.
  #syncFor(to, cursor) {
    const sync = {
      t: "sync",
      to,
      from: this.#tabId,
      state: this.#state,
      detail: {},
      user: this.#user,
      unread: this.#unread,
      counts: this.#counts,
      frames: [],
    };
    if (typeof cursor === "string" && cursor && cursor !== this.#cursor) {
      let index = -1;
      for (let i = this.#relayLog.length - 1; i >= 0; i -= 1) {
        if (this.#relayLog[i].cursor === cursor) {
          index = i;
          break;
        }
      }
      if (index >= 0) sync.frames = this.#relayLog.slice(index + 1);
      else sync.resync = this.#cursor;
    }
    return sync;
  }

  #sendFor({ from, ref, frame }) {
    if (!frame || typeof frame !== "object") return;
    if (this.#helloed && this.#wsSend(frame)) {
      this.#post({ t: "ack", to: from, ref });
      return;
    }
    this.#remoteQueue.push({ from, ref, frame, deadline: Date.now() + this.#options.requestTimeoutMs });
    if (this.#remoteQueue.length > REMOTE_QUEUE_LIMIT) this.#remoteQueue.shift();
  }
}
