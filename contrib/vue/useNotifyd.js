// useNotifyd: a Vue 3 composable over notifyd's browser client (notifyd.js).
//
//   import { createClient } from "https://push.example.com/notifyd.js";
//   import { useNotifyd } from "./useNotifyd.js";
//
//   const notifyd = useNotifyd(createClient({ token: fetchToken }));
//   notifyd.messages     // reactive list, newest first: live pushes, the first
//                        // history page, "load more"; read/deleted kept in step
//   notifyd.unread       // total unread; notifyd.byType: { order: 3, system: 1 }
//   notifyd.state        // "connecting" | "open" | "reconnecting" | ...
//   notifyd.markRead(id) / markAllRead(type) / markUnread(id) / remove(id) / loadMore()
//
// Works with a bundler (`import ... from "vue"`) and without one: with Vue's
// global build, map "vue" to vue-global.js in an import map (docs/client.md).
// Everything it shows comes from the server's events, so every tab and
// session of the user agrees; the actions only send. tests/test_vue.py runs
// it in Chromium with Vue's and Element Plus's own browser builds.

import { computed, getCurrentScope, onScopeDispose, readonly, ref, shallowRef } from "vue";

/**
 * Reactive state and actions over a notifyd client.
 *
 * @param client  a client from notifyd.js's `createClient` (shared by the
 *                composables of one page, or one per component)
 * @param options `pageSize` (messages per history page, 1..100, default 20),
 *                `max` (most messages kept in `messages`, default 500),
 *                `onMessage` (called with each new live message: a toast),
 *                `closeOnDispose` (close the client with the component's
 *                scope, default true)
 */
export function useNotifyd(client, options = {}) {
  const pageSize = options.pageSize ?? 20;
  const max = options.max ?? 500;
  const closeOnDispose = options.closeOnDispose ?? true;

  const state = ref(client.state);
  const user = ref(client.user);
  const messages = ref([]);
  const counts = shallowRef(client.counts ?? { total: 0, byType: {} });
  const more = ref(true);
  const loading = ref(false);
  const error = shallowRef(null);

  const connected = computed(() => state.value === "open");
  const unread = computed(() => counts.value.total);
  const byType = computed(() => counts.value.byType);
  // The categories seen in counts or in the list, for tabs and badges.
  const types = computed(() => {
    const seen = new Set(Object.keys(counts.value.byType));
    for (const message of messages.value) seen.add(message.type ?? "");
    return [...seen].sort();
  });

  // Ids in the list, so a message is never shown twice (a history page and
  // a live push can both carry it).
  const known = new Set();

  function add(list, position) {
    const fresh = list.filter((message) => !known.has(message.id));
    for (const message of fresh) known.add(message.id);
    if (position === "newest") messages.value.unshift(...fresh);
    else messages.value.push(...fresh);
    while (messages.value.length > max) known.delete(messages.value.pop().id);
  }

  function reset(list) {
    known.clear();
    messages.value = [];
    add(list, "oldest");
  }

  async function reload() {
    loading.value = true;
    const before = new Set(known);
    try {
      const page = await client.history({ limit: pageSize });
      // Pushes that arrived while the page was on its way may be newer than
      // it: keep them on top.
      const live = messages.value.filter((message) => !before.has(message.id));
      reset(page.messages);
      add(live, "newest");
      more.value = page.more;
    } catch (failure) {
      error.value = failure;
    } finally {
      loading.value = false;
    }
  }

  async function loadMore() {
    if (loading.value || !more.value) return;
    const oldest = messages.value.at(-1) ?? null;
    loading.value = true;
    try {
      const page = await client.history({ before: oldest, limit: pageSize });
      add(page.messages, "oldest");
      more.value = page.more;
    } catch (failure) {
      error.value = failure;
    } finally {
      loading.value = false;
    }
  }

  function setRead(read) {
    const isRead = read.isRead ?? "1";
    const ids = read.all ? null : new Set(read.ids);
    for (const message of messages.value) {
      const hit = ids ? ids.has(message.id) : read.type == null || read.type === message.type;
      // markAllRead reads unread messages only; unread again is by id.
      if (hit && (ids || message.isRead === "0")) message.isRead = isRead;
    }
  }

  function drop(ids) {
    const gone = new Set(ids);
    messages.value = messages.value.filter((message) => !gone.has(message.id));
    for (const id of gone) known.delete(id);
  }

  let loaded = false;
  const unsubscribe = [
    client.on("state", (event) => {
      state.value = event.state;
    }),
    client.on("hello", (hello) => {
      user.value = hello.user;
      error.value = null;
      // The first page once; after a reconnect the replay fills the gap, or
      // a resync (below) says it could not.
      if (!loaded) {
        loaded = true;
        reload();
      }
    }),
    client.on("message", (message) => {
      if (known.has(message.id)) return;
      add([message], "newest");
      options.onMessage?.(message);
    }),
    client.on("unread", ({ count, byType: types }) => {
      counts.value = Object.freeze({ total: count, byType: types ?? {} });
    }),
    client.on("read", setRead),
    client.on("deleted", ({ ids }) => drop(ids)),
    client.on("resync", () => reload()),
    client.on("error", (event) => {
      error.value = event;
    }),
  ];

  function dispose() {
    for (const off of unsubscribe) off();
    if (closeOnDispose) client.close();
  }
  if (getCurrentScope()) onScopeDispose(dispose);

  const ids = (idOrIds) => (typeof idOrIds === "string" ? [idOrIds] : [...idOrIds]);

  return {
    client,
    state: readonly(state),
    connected,
    user: readonly(user),
    messages: readonly(messages),
    unread,
    byType,
    types,
    countOf: (type) => counts.value.byType[type ?? ""] ?? 0,
    more: readonly(more),
    loading: readonly(loading),
    error: readonly(error),
    markRead: (idOrIds) => client.markRead(ids(idOrIds)),
    markAllRead: (type) => client.markAllRead(type),
    markUnread: (idOrIds) => client.markUnread(ids(idOrIds)),
    remove: (idOrIds) => client.delete(ids(idOrIds)),
    loadMore,
    reload,
    reconnect: () => client.reconnect(),
    dispose,
  };
}
