// Type declarations for notifyd.js, the browser client of notifyd (wire protocol v1).
// See docs/client.md for usage and docs/protocol.md for the frames.

export declare const PROTOCOL_VERSION: 1;

/** A pushed (or listed) row of t_message_real_time, in camelCase. */
export interface Message {
  event: "message";
  /** Resume position (pushed) or "~<seq>" (history); pass either as `history({ before })`. */
  cursor: string;
  id: string;
  title: string;
  content: string;
  type: string | null;
  sendUser: string | null;
  /** The addressee, or "*" for an announcement to everyone. */
  toUser: string;
  /** ISO 8601 with milliseconds. */
  sendTime: string;
  /** An http(s) URL or a "/path", or null: safe to use as a link href. */
  skipUrl: string | null;
  /** "0" unread, "1" read. */
  isRead: "0" | "1";
  /**
   * The counts after this message, on the last of the new messages a
   * delivery round brought (the client asks for them with `counts=inline`);
   * applied to `client.counts` before the `message` event fires.
   */
  unread?: number;
  unreadByType?: Record<string, number>;
  [field: string]: unknown;
}

/** The unread counts: the total (announcements included) and per message type. */
export interface UnreadCounts {
  readonly total: number;
  /**
   * Type -> unread count; messages without a type count under "". Types with
   * no unread message are left out; `{}` when the server sends no per-type
   * counts.
   */
  readonly byType: Readonly<Record<string, number>>;
}

export type State =
  | "idle"
  | "connecting"
  | "open"
  | "reconnecting"
  | "replaced"
  | "unauthorized"
  | "closed";

export type Role = "solo" | "leader" | "follower";

export interface StateEvent {
  state: State;
  previous: State;
  role: Role;
  /** The close code that caused a "reconnecting", "replaced" or "unauthorized". */
  code?: number;
  reason?: string;
  /** Milliseconds until the next attempt ("reconnecting"). */
  delay?: number;
  /** Consecutive failed attempts ("reconnecting"). */
  attempt?: number;
}

export interface UnreadEvent {
  /** The total, as `client.unread`. */
  count: number;
  /** Per type, as `client.counts.byType` (`{}` from a server without per-type counts). */
  byType: Readonly<Record<string, number>>;
}

export interface ReadEvent {
  /** The messages concerned; absent when `all` is true. */
  ids?: string[];
  /** Every unread message (of `type`, when not null) is now read. */
  all?: boolean;
  type?: string | null;
  /** "0" when the messages were marked unread again. */
  isRead?: "0";
}

export interface DeletedEvent {
  /** Gone from this user's inbox: deleted by the app, by `delete()` in any tab or session, or expired (its `expire_at` passed). */
  ids: string[];
}

export interface ResyncEvent {
  /** The position the client continues from (already stored). */
  cursor: string | null;
}

export interface HelloEvent {
  user: string | null;
  unread: number;
  recovered?: boolean;
  cursor: string;
}

export interface ErrorEvent {
  /** "token" (the token function failed), "connect", or a server error code. */
  code: string;
  message: string;
  error?: unknown;
}

export interface EventMap {
  message: Message;
  unread: UnreadEvent;
  read: ReadEvent;
  deleted: DeletedEvent;
  /** Messages were missed that will not be replayed: reload the list (history). Fires once per gap. */
  resync: ResyncEvent;
  state: StateEvent;
  hello: HelloEvent;
  error: ErrorEvent;
}

/** Where the resume cursor is kept between page loads (default: sessionStorage). */
export interface CursorStore {
  get(key: string): string | null;
  set(key: string, value: string): void;
  remove?(key: string): void;
}

export interface ClientOptions {
  /**
   * Returns a token (JWT) for the current user; called at every (re)connect,
   * so it can fetch a fresh, short-lived one. A string works for tests.
   */
  token: (() => string | Promise<string>) | string;
  /** The push endpoint; default: ws(s)://<host notifyd.js was loaded from>/ws/message. */
  url?: string;
  /** Put the token (and cursor) in the URL instead of the first frame. Default false: URLs end up in logs. */
  tokenInUrl?: boolean;
  /** Share one connection between the tabs of this origin (needs BroadcastChannel and Web Locks). Default true. */
  share?: boolean;
  /** Tabs with the same key share a connection; default: the URL. Use the user id when tabs of one origin may be signed in as different users. */
  shareKey?: string;
  /** Cursor storage; default sessionStorage (memory when unavailable); null: memory only. */
  store?: CursorStore | null;
  /** Key of the cursor in the store; default "notifyd.cursor:" + shareKey. */
  storeKey?: string;
  /** First backoff cap (ms); doubles per failed attempt, delay drawn uniformly below it. Default 500. */
  initialDelayMs?: number;
  /** Backoff cap (ms). Default 30000. */
  maxDelayMs?: number;
  /** After close code 1012 (server restart), reconnect after a random delay below this (ms). Default 2000. */
  restartDelayMs?: number;
  /** After close code 1012, an attempt refused before the upgrade (the new server not listening yet) is retried after 0.5 to 1.5 times this (ms) instead of the backoff. Default 1000. */
  restartRetryMs?: number;
  /** How long after the 1012 (ms) refused attempts are retried that way; then the backoff. Default 60000. */
  restartRetryForMs?: number;
  /** A session that lasted this long (ms) resets the backoff. Default 10000. */
  stableAfterMs?: number;
  /** Consecutive 4401 closes before giving up with state "unauthorized". Default 3. */
  maxUnauthorized?: number;
  /** Deadline of markRead/markAllRead/markUnread/delete (until sent) and history (until answered), ms. Default 15000. */
  requestTimeoutMs?: number;
  /** From connecting to hello, ms; then the attempt is abandoned. Default 20000. */
  helloTimeoutMs?: number;
  /** Application ping interval while open, ms. Default 25000. */
  pingIntervalMs?: number;
  /** A ping not answered within this (ms) drops the connection. Default 10000. */
  pongTimeoutMs?: number;
  /**
   * Ask the token function for a new token this long before the current
   * one's `exp` (halfway, for shorter tokens) and extend the open session
   * with it; 0: never, the session then ends with 4401 at `exp` and
   * reconnects. Default 60000.
   */
  refreshBeforeMs?: number;
  /** How many recent message ids are remembered to drop duplicates (0: none). Default 1000. */
  dedupeSize?: number;
  /** How many recent frames a leader keeps to catch up a reloaded tab. Default 500. */
  relayLogSize?: number;
  /** A WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: typeof WebSocket;
}

export interface HistoryOptions {
  /** Older than this message (or its cursor); null/absent: the newest. */
  before?: string | Pick<Message, "cursor"> | null;
  /** 1 to 100; default 20. */
  limit?: number;
  type?: string | null;
  unreadOnly?: boolean;
}

export interface HistoryPage {
  /** Newest first; `isRead` as this user sees it. */
  messages: Message[];
  /** Whether older messages exist. */
  more: boolean;
}

/** What request Promises reject with. */
export declare class NotifydError extends Error {
  /** "timeout", "disconnected", "closed", "replaced", "unauthorized", or a server code ("invalid", "unavailable", ...). */
  readonly code: string;
  constructor(code: string, message: string);
}

export declare const DEFAULTS: Readonly<Required<Omit<ClientOptions, "token" | "url" | "shareKey" | "store" | "storeKey" | "WebSocket">>>;

export declare class NotifydClient {
  constructor(options: ClientOptions);
  readonly state: State;
  readonly role: Role;
  /** The last stored resume cursor. */
  readonly cursor: string | null;
  /** The last known unread count (null before the first hello). */
  readonly unread: number | null;
  /** The last known unread counts, in total and per type (null before the first hello). */
  readonly counts: UnreadCounts | null;
  /** The authenticated user, from hello. */
  readonly user: string | null;
  /** Subscribe; returns an unsubscribe function. */
  on<K extends keyof EventMap>(name: K, handler: (event: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(name: K, handler: (event: EventMap[K]) => void): void;
  /** Mark messages read; resolves when sent. The `read` and `unread` events follow on every tab and session. */
  markRead(ids: string | Iterable<string>): Promise<void>;
  /** Mark all unread messages (of `type`) read; resolves when sent. */
  markAllRead(type?: string | null): Promise<void>;
  /** Mark messages unread again; resolves when sent. A `read` event with `isRead: "0"` and the `unread` event follow on every tab and session. */
  markUnread(ids: string | Iterable<string>): Promise<void>;
  /**
   * Remove messages from this user's inbox (an announcement for this user
   * only); resolves when sent. The `deleted` event, and `unread` when the
   * counts change, follow on every tab and session.
   */
  delete(ids: string | Iterable<string>): Promise<void>;
  /** One page of the inbox, newest first. Rejects with NotifydError on an error answer, timeout or disconnect. */
  history(options?: HistoryOptions): Promise<HistoryPage>;
  /** Send another client frame (`{ action, ... }`, e.g. the demo's `demo_send`); resolves when sent. Errors arrive as `error` events. */
  send(frame: { action: string; [field: string]: unknown }): Promise<void>;
  /** Reconnect now (after "unauthorized", or to skip a backoff wait). */
  reconnect(): void;
  /** Close for good; with tab sharing, another tab takes the connection over. */
  close(): void;
}

/** Create a client; it starts connecting right after the current task. */
export declare function createClient(options: ClientOptions): NotifydClient;
