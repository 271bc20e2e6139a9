// The demo message center: categories with their unread badges (from the
// client's per-type counts), the total on a bell, the selected category's
// messages paged with history ("load more", "unread only"), open to mark
// read, mark unread again, delete, mark a category read, toasts. Everything it knows comes from
// notifyd.js, so every tab of a user stays in step through the server's
// events. `notifyd demo` serves it at /?user=<name> with that demo user's
// token in <meta name="notifyd-demo"> and a form that sends to the demo
// users; elsewhere open it as /demo#token=<JWT>. English or Chinese, after
// navigator.language; every text is in STRINGS.
import { createClient } from "./notifyd.js";

const unreadEn = (n) => (n === 1 ? "1 unread message" : `${n} unread messages`);
const unreadZh = (n) => `${n} 条未读消息`;

const STRINGS = {
  en: {
    locale: "en",
    brand: "notifyd demo",
    center: "My messages",
    categories: {
      all: "All messages",
      comment: "Comments",
      like: "Likes and favourites",
      follow: "New followers",
      private: "Private messages",
      system: "System notices",
      other: "Other",
    },
    noType: "Other (no type)",
    unreadOnly: "Unread only",
    markAll: "Mark all read",
    empty: "No messages here yet.",
    emptyUnread: "No unread messages here.",
    more: "Load more",
    loading: "Loading…",
    unreadHint: "Unread: ",
    open: "Open",
    dismiss: "Dismiss",
    markUnread: "Mark unread",
    markUnreadLabel: (title) => `Mark unread: ${title}`,
    delete: "Delete",
    deleteLabel: (title) => `Delete: ${title}`,
    unread: unreadEn,
    bellLabel: (n) => `Messages, ${unreadEn(n)}`,
    categoryLabel: (name, n) => (n ? `${name}, ${unreadEn(n)}` : name),
    signedInAs: (user) => `Signed in as ${user}`,
    status: {
      idle: "starting",
      connecting: "connecting…",
      open: "live",
      reconnecting: "reconnecting…",
      replaced: "replaced by a newer session",
      unauthorized: "token refused",
      closed: "closed",
    },
    introHeading: "Try it",
    introText:
      "New messages pop up as toasts and move the badges of their category and the bell; " +
      "open one to mark it read, and use the buttons beside it to mark it unread again or " +
      "delete it. Open this page in a second window to watch messages and read state move " +
      "between them.",
    demoUsers: "Demo users",
    you: (user, others, again) => ["You are ", strong(user), ". Open the page of ", ...others, " in another window, or ", again(`${user}'s again`), "."],
    listJoin: [", ", " or "],
    sendHeading: "Send a message",
    sendTo: "To",
    sendType: "Category",
    sendTitle: "Title",
    sendContent: "Content",
    sendLink: "Link",
    optional: "(optional)",
    sendLinkPlaceholder: "https://example.com/orders/17 or /orders/17",
    defaultTitle: "Hello",
    defaultContent: "Sent from the demo page",
    send: "Send",
    yourself: (user) => `${user} (you)`,
    sending: "Sending…",
    sent: (to) => `Sent to ${to}.`,
    notSent: (message) => `Not sent: ${message}`,
    pageTitle: (user) => (user ? `${user} · My messages · notifyd demo` : "My messages · notifyd demo"),
    loginHeading: "Sign in to the demo",
    loginHelp: ["Paste a token for a user (", code("notifyd token u42"), " prints one), or open this page as ", code("/demo#token=…"), "."],
    token: "Token",
    loginButton: "Open my messages",
  },
  zh: {
    locale: "zh-CN",
    brand: "notifyd 演示",
    center: "我的消息",
    categories: {
      all: "全部消息",
      comment: "评论",
      like: "赞和收藏",
      follow: "新增粉丝",
      private: "私信",
      system: "系统通知",
      other: "其他",
    },
    noType: "其他（无类型）",
    unreadOnly: "只看未读",
    markAll: "全部标为已读",
    empty: "这里还没有消息。",
    emptyUnread: "这里没有未读消息。",
    more: "加载更多",
    loading: "加载中…",
    unreadHint: "未读：",
    open: "打开",
    dismiss: "关闭",
    markUnread: "标为未读",
    markUnreadLabel: (title) => `标为未读：${title}`,
    delete: "删除",
    deleteLabel: (title) => `删除：${title}`,
    unread: unreadZh,
    bellLabel: (n) => `消息，${unreadZh(n)}`,
    categoryLabel: (name, n) => (n ? `${name}，${unreadZh(n)}` : name),
    signedInAs: (user) => `当前用户：${user}`,
    status: {
      idle: "启动中",
      connecting: "连接中…",
      open: "已连接",
      reconnecting: "重新连接中…",
      replaced: "已被新的会话取代",
      unauthorized: "令牌被拒绝",
      closed: "已关闭",
    },
    introHeading: "试一试",
    introText:
      "新消息会以弹出提示出现，并更新所属分类和铃铛上的角标；打开一条消息即标为已读，" +
      "用旁边的按钮可以把它重新标为未读或删除。" +
      "在另一个窗口中打开本页，可以看到消息和已读状态在两个窗口之间同步。",
    demoUsers: "演示用户",
    you: (user, others, again) => ["你是 ", strong(user), "。在另一个窗口中打开 ", ...others, " 的页面，或者再打开一个 ", again(`${user} 的页面`), "。"],
    listJoin: ["、", " 或 "],
    sendHeading: "发送消息",
    sendTo: "收件人",
    sendType: "分类",
    sendTitle: "标题",
    sendContent: "内容",
    sendLink: "链接",
    optional: "（可选）",
    sendLinkPlaceholder: "https://example.com/orders/17 或 /orders/17",
    defaultTitle: "你好",
    defaultContent: "来自演示页面",
    send: "发送",
    yourself: (user) => `${user}（你）`,
    sending: "发送中…",
    sent: (to) => `已发送给 ${to}。`,
    notSent: (message) => `发送失败：${message}`,
    pageTitle: (user) => (user ? `${user} · 我的消息 · notifyd 演示` : "我的消息 · notifyd 演示"),
    loginHeading: "登录演示",
    loginHelp: ["粘贴某个用户的令牌（", code("notifyd token u42"), " 可以生成一个），或者以 ", code("/demo#token=…"), " 打开本页。"],
    token: "令牌",
    loginButton: "打开我的消息",
  },
};

// The categories, as the message types they show. "all" lists everything,
// "other" every type not listed here (and messages without a type).
const TYPES = ["comment", "like", "follow", "private", "system"];
const CATEGORIES = ["all", ...TYPES, "other"];
const PAGE_SIZE = 20;
// "other" has no server-side filter: it pages through everything and keeps
// what matches, up to this many pages per "load more".
const OTHER_PAGES_PER_LOAD = 5;
// Marking "other" read pages through the unread messages to find their ids.
const MARK_OTHER_MAX_PAGES = 50;

const $ = (selector) => document.querySelector(selector);
const svg = (path) =>
  `<svg viewBox="0 0 24 24" aria-hidden="true"><path d="${path}" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"/></svg>`;
const ICON_LINK = svg("M14 4h6v6M20 4l-9 9M18 14v5a1 1 0 0 1-1 1H5a1 1 0 0 1-1-1V7a1 1 0 0 1 1-1h5");
const ICON_CLOSE = svg("M6 6l12 12M18 6 6 18");
const ICON_UNREAD = svg("M4 7h11M4 12h8M4 17h8M18 15a3 3 0 1 0 0-6 3 3 0 0 0 0 6Z");
const ICON_DELETE = svg("M4 7h16M9 7V4h6v3M6 7l1 12a1 1 0 0 0 1 1h8a1 1 0 0 0 1-1l1-12M10 11v6M14 11v6");
const ICONS = {
  all: svg("M4 13h4l2 3h4l2-3h4M4 13l2.5-7h11l2.5 7v5a1 1 0 0 1-1 1H5a1 1 0 0 1-1-1v-5Z"),
  comment: svg("M5 5h14a1 1 0 0 1 1 1v9a1 1 0 0 1-1 1h-8l-4 3v-3H5a1 1 0 0 1-1-1V6a1 1 0 0 1 1-1Z"),
  like: svg("M12 20s-7-4.4-7-10a4 4 0 0 1 7-2.6A4 4 0 0 1 19 10c0 5.6-7 10-7 10Z"),
  follow: svg("M10 11a4 4 0 1 0 0-8 4 4 0 0 0 0 8ZM3 21a7 7 0 0 1 14 0M19 8v6M16 11h6"),
  private: svg("M4 6h16v12H4zM4 7l8 6 8-6"),
  system: svg("M4 10v4h3l6 4V6L7 10H4ZM17 9a4 4 0 0 1 0 6"),
  other: svg("M6 12h.01M12 12h.01M18 12h.01"),
};

const T = STRINGS[/^zh\b/i.test(navigator.language ?? "") ? "zh" : "en"];

function strong(text) {
  const element = document.createElement("strong");
  element.textContent = text;
  return element;
}

function code(text) {
  const element = document.createElement("code");
  element.textContent = text;
  return element;
}

const params = new URLSearchParams(location.hash.slice(1));
const demo = demoConfig();
const token = demo?.token ?? params.get("token");

translatePage();
if (!token) {
  $("#status").hidden = true;
  $("#login").hidden = false;
  $("#login").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = new URLSearchParams({ token: $("#token").value.trim() }).toString();
    location.reload();
  });
} else {
  start(token);
}

// The page's fixed texts, from the table: data-i18n names the string.
function translatePage() {
  document.documentElement.lang = T.locale;
  document.title = T.pageTitle(demo?.user ?? "");
  for (const element of document.querySelectorAll("[data-i18n]")) {
    element.textContent = T[element.dataset.i18n];
  }
  for (const element of document.querySelectorAll("[data-i18n-placeholder]")) {
    element.placeholder = T[element.dataset.i18nPlaceholder];
  }
  for (const element of document.querySelectorAll("[data-i18n-label]")) {
    element.setAttribute("aria-label", T[element.dataset.i18nLabel]);
  }
  $("#login-help").replaceChildren(...T.loginHelp);
  $("#status").textContent = T.status.idle;
}

// {user, token, users} when `notifyd demo` served this page, else null.
function demoConfig() {
  const meta = document.querySelector('meta[name="notifyd-demo"]');
  if (!meta) return null;
  try {
    const config = JSON.parse(meta.content);
    return typeof config.token === "string" && Array.isArray(config.users) ? config : null;
  } catch {
    return null;
  }
}

// The token's user, for the header and to keep users apart between tabs
// (the demo can be open as two users in one browser). Not verified here:
// the server does that.
function tokenUser(jwt) {
  try {
    const payload = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return String(JSON.parse(atob(payload)).sub ?? "");
  } catch {
    return "";
  }
}

function seqOf(message) {
  const match = /~(\d+)$/.exec(message.cursor ?? "");
  return match ? Number(match[1]) : Number.MAX_SAFE_INTEGER;
}

function categoryOf(type) {
  return TYPES.includes(type) ? type : "other";
}

// A category's unread count from the client's counts.
function unreadIn(category, counts) {
  if (!counts) return 0;
  if (category === "all") return counts.total;
  if (category !== "other") return counts.byType[category] ?? 0;
  return Object.entries(counts.byType).reduce(
    (sum, [type, count]) => (TYPES.includes(type) ? sum : sum + count),
    0,
  );
}

function badgeText(count) {
  return count > 99 ? "99+" : String(count);
}

function start(jwt) {
  const user = tokenUser(jwt);
  const client = createClient({ token: () => jwt, shareKey: `demo:${user || jwt}` });
  window.notifydClient = client; // for the console, and the browser tests

  // What this tab shows: a category, maybe unread only; the messages listed,
  // and where the next page of history starts.
  const view = { category: "all", unreadOnly: false };
  const messages = new Map(); // id -> message
  let before = null;
  let more = false;
  let loading = false;
  let loaded = false;
  let generation = 0; // a new view makes answers to earlier requests stale

  const list = $("#list");
  const badge = $("#badge");
  const bell = $("#bell");
  const categoryButtons = new Map();

  bell.hidden = false;
  $("#panel").hidden = false;
  $("#intro").hidden = false;
  if (demo) setUpDemo(client, user);

  for (const category of CATEGORIES) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "cat";
    button.dataset.category = category;
    button.innerHTML = ICONS[category];
    const name = document.createElement("span");
    name.className = "cat-name";
    name.textContent = T.categories[category];
    const count = document.createElement("span");
    count.className = "cat-badge";
    count.setAttribute("aria-hidden", "true"); // the button's label says it
    count.hidden = true;
    button.append(name, count);
    button.addEventListener("click", () => select(category));
    const item = document.createElement("li");
    item.append(button);
    $("#categories").append(item);
    categoryButtons.set(category, button);
  }
  showCounts(null);
  showView();

  // The bell leads to every message.
  bell.addEventListener("click", () => {
    select("all");
    $("#pane-title").focus();
  });
  $("#unread-only").addEventListener("change", (event) => {
    view.unreadOnly = event.target.checked;
    reload({ clear: true });
  });
  $("#mark-all").addEventListener("click", () => markCategoryRead(view.category).catch(showError));
  $("#more").addEventListener("click", () => loadPage(generation));

  client.on("state", ({ state }) => {
    const status = $("#status");
    status.dataset.state = state;
    status.textContent = T.status[state] ?? state;
    if (state === "open" && !loaded) reload();
  });
  client.on("hello", ({ user: helloUser }) => {
    $("#who").textContent = helloUser ? T.signedInAs(helloUser) : "";
  });
  // Errors that answer no request, e.g. a refused demo_send.
  client.on("error", ({ code, message }) => {
    if (demo) sendStatus(T.notSent(`${message} (${code})`), true);
    showError(new Error(`${code}: ${message}`));
  });
  client.on("unread", ({ count }) => {
    showCounts(client.counts);
    $("#announce").textContent = T.unread(count);
  });
  client.on("message", (message) => {
    if (matches(message)) {
      messages.set(message.id, message);
      render();
    }
    toast(message);
  });
  client.on("read", ({ ids, all, type, isRead }) => {
    const value = isRead ?? "1";
    for (const message of messages.values()) {
      if (all ? type == null || message.type === type : ids?.includes(message.id)) message.isRead = value;
    }
    render();
  });
  client.on("deleted", ({ ids }) => {
    for (const id of ids) messages.delete(id);
    render();
  });
  // Missed messages that will not be replayed: start the list over.
  client.on("resync", () => reload({ clear: true }));

  function select(category) {
    if (category === view.category) return;
    view.category = category;
    showView();
    reload({ clear: true });
  }

  function showView() {
    for (const [category, button] of categoryButtons) {
      if (category === view.category) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
    $("#pane-title").textContent = T.categories[view.category];
  }

  function showCounts(counts) {
    const total = counts?.total ?? 0;
    badge.textContent = badgeText(total);
    badge.hidden = total === 0;
    bell.setAttribute("aria-label", T.bellLabel(total));
    for (const [category, button] of categoryButtons) {
      const count = unreadIn(category, counts);
      const countBadge = button.querySelector(".cat-badge");
      countBadge.textContent = badgeText(count);
      countBadge.hidden = count === 0;
      button.setAttribute("aria-label", T.categoryLabel(T.categories[category], count));
    }
  }

  function matches(message) {
    if (view.unreadOnly && message.isRead === "1") return false;
    return view.category === "all" || categoryOf(message.type) === view.category;
  }

  function reload({ clear = false } = {}) {
    loaded = true;
    generation += 1;
    loading = false;
    before = null;
    more = false;
    if (clear) {
      messages.clear();
      render();
    }
    loadPage(generation);
  }

  // The next page of the view (the first after a reload). "other" keeps
  // going through a few pages when they hold too few of its messages.
  async function loadPage(current) {
    if (loading || current !== generation) return;
    loading = true;
    render();
    const other = view.category === "other";
    let found = 0;
    try {
      for (let round = 0; round < (other ? OTHER_PAGES_PER_LOAD : 1); round += 1) {
        const page = await client.history({
          limit: PAGE_SIZE,
          before,
          type: other || view.category === "all" ? null : view.category,
          unreadOnly: view.unreadOnly,
        });
        if (current !== generation) return;
        for (const message of page.messages) {
          if (!matches(message)) continue;
          messages.set(message.id, message);
          found += 1;
        }
        if (page.messages.length) before = page.messages.at(-1).cursor;
        more = page.more;
        if (!more || found >= PAGE_SIZE) break;
      }
    } catch (error) {
      if (current === generation && !before) loaded = false; // try again at the next "open"
      showError(error);
    } finally {
      if (current === generation) {
        loading = false;
        render();
      }
    }
  }

  function markCategoryRead(category) {
    if (category === "all") return client.markAllRead();
    if (category !== "other") return client.markAllRead(category);
    return markOtherRead();
  }

  // "other" is many types, and messages without one: find its unread ids.
  async function markOtherRead() {
    const ids = [];
    let cursor = null;
    for (let page = 0; page < MARK_OTHER_MAX_PAGES; page += 1) {
      const answer = await client.history({ limit: 100, before: cursor, unreadOnly: true });
      for (const message of answer.messages) {
        if (categoryOf(message.type) === "other") ids.push(message.id);
      }
      if (!answer.more || !answer.messages.length) break;
      cursor = answer.messages.at(-1).cursor;
    }
    await client.markRead(ids);
  }

  function render() {
    const sorted = [...messages.values()].sort((a, b) => seqOf(b) - seqOf(a));
    const focus = focusInList();
    list.replaceChildren(...sorted.map(item));
    if (focus) restoreFocus(focus);
    const empty = $("#empty");
    empty.hidden = sorted.length > 0 || loading;
    empty.textContent = view.unreadOnly ? T.emptyUnread : T.empty;
    const moreButton = $("#more");
    moreButton.hidden = !more;
    moreButton.disabled = loading;
    moreButton.textContent = loading ? T.loading : T.more;
  }

  // The list is redrawn at every change: keyboard focus on one of its
  // controls stays on that control, or on its message when the control is
  // gone (marked unread), or on the message now in its place (deleted).
  function focusInList() {
    const active = document.activeElement;
    const row = active?.closest?.("#list > li");
    if (!row) return null;
    return { id: row.dataset.id, index: [...list.children].indexOf(row), control: active.dataset.control };
  }

  function restoreFocus({ id, index, control }) {
    const rows = [...list.children];
    const row = rows.find((li) => li.dataset.id === id);
    const target = row
      ? row.querySelector(`[data-control="${control}"]`) ?? row.querySelector(".msg-body")
      : rows[Math.min(index, rows.length - 1)]?.querySelector(".msg-body") ?? $("#pane-title");
    target.focus({ preventScroll: true });
  }

  function item(message) {
    const unread = message.isRead !== "1";
    const li = document.createElement("li");
    li.className = unread ? "msg unread" : "msg";
    li.dataset.id = message.id;
    li.dataset.category = categoryOf(message.type);

    const body = document.createElement("button");
    body.type = "button";
    body.className = "msg-body";
    body.dataset.control = "open";
    const dot = document.createElement("span");
    dot.className = "dot";
    const title = document.createElement("span");
    title.className = "msg-title";
    title.textContent = message.title;
    if (unread) {
      const hint = document.createElement("span");
      hint.className = "visually-hidden";
      hint.textContent = T.unreadHint;
      title.prepend(hint);
    }
    const meta = document.createElement("span");
    meta.className = "msg-meta";
    if (view.category === "all") {
      const chip = document.createElement("span");
      chip.className = "msg-type";
      chip.textContent = T.categories[categoryOf(message.type)];
      meta.append(chip);
    }
    const time = document.createElement("time");
    time.className = "msg-time";
    time.dateTime = message.sendTime;
    time.textContent = formatTime(message.sendTime);
    meta.append(time);
    const content = document.createElement("span");
    content.className = "msg-content";
    content.textContent = message.content;
    body.append(dot, title, meta, content);
    // Opening a message reads it, on every tab and session of the user.
    body.addEventListener("click", () => {
      if (message.isRead !== "1") client.markRead([message.id]).catch(showError);
    });
    li.append(body);

    if (message.skipUrl) {
      // The server passes only http(s) URLs and /paths: safe as a link.
      const link = document.createElement("a");
      link.className = "msg-link";
      link.dataset.control = "link";
      link.href = message.skipUrl;
      link.rel = "noopener";
      link.innerHTML = ICON_LINK;
      link.append(document.createTextNode(` ${T.open}`));
      link.addEventListener("click", () => client.markRead([message.id]).catch(showError));
      li.append(link);
    }
    // The list changes when the server's events arrive (a `read` with
    // isRead "0", a `deleted`), on every tab and session of the user alike;
    // the counts and badges come with them.
    const actions = document.createElement("span");
    actions.className = "msg-actions";
    if (!unread) {
      actions.append(
        actionButton("unread", ICON_UNREAD, T.markUnread, T.markUnreadLabel(message.title), () =>
          client.markUnread([message.id]),
        ),
      );
    }
    actions.append(
      actionButton("delete", ICON_DELETE, T.delete, T.deleteLabel(message.title), () =>
        client.delete([message.id]),
      ),
    );
    li.append(actions);
    return li;
  }

  function actionButton(control, icon, tip, label, act) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `msg-action msg-${control}`;
    button.dataset.control = control;
    button.innerHTML = icon;
    button.title = tip;
    button.setAttribute("aria-label", label);
    button.addEventListener("click", () => act().catch(showError));
    return button;
  }

  function toast(message) {
    const box = document.createElement("div");
    box.className = "toast";
    const kind = document.createElement("span");
    kind.className = "toast-type";
    kind.textContent = T.categories[categoryOf(message.type)];
    const title = document.createElement("strong");
    title.textContent = message.title;
    const content = document.createElement("p");
    content.textContent = message.content;
    box.append(kind, title, content);
    if (message.skipUrl) {
      const link = document.createElement("a");
      link.href = message.skipUrl;
      link.rel = "noopener";
      link.textContent = T.open;
      box.append(link);
    }
    const close = document.createElement("button");
    close.type = "button";
    close.className = "toast-close";
    close.setAttribute("aria-label", T.dismiss);
    close.innerHTML = ICON_CLOSE;
    close.addEventListener("click", () => box.remove());
    box.append(close);
    $("#toasts").append(box);
    while ($("#toasts").children.length > 4) $("#toasts").firstElementChild.remove();
    setTimeout(() => box.remove(), 8000);
  }

  function formatTime(value) {
    const date = new Date(value);
    return Number.isNaN(date.getTime())
      ? ""
      : date.toLocaleString(T.locale, { dateStyle: "short", timeStyle: "short" });
  }

  function showError(error) {
    console.warn("notifyd demo:", error);
  }
}

// The demo's extras: who this page is, links to the other demo users' pages,
// and a form that sends them a message of a category (the demo-only
// demo_send action, a plain INSERT on the server, delivered like any other
// row).
function setUpDemo(client, user) {
  const others = demo.users.filter((name) => name !== user);
  const userLink = (name, text = name) => {
    const link = document.createElement("a");
    link.href = `?user=${encodeURIComponent(name)}`;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = text;
    return link;
  };
  const [comma, or] = T.listJoin;
  const otherLinks = others.flatMap((name, index) => {
    if (!index) return [userLink(name)];
    return [index === others.length - 1 ? or : comma, userLink(name)];
  });
  const you = document.createElement("p");
  you.append(...T.you(demo.user, otherLinks, (text) => userLink(demo.user, text)));
  const nav = $("#users");
  nav.replaceChildren(you);
  nav.hidden = false;

  const form = $("#send");
  const to = $("#send-to");
  for (const name of [...others, demo.user]) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name === demo.user ? T.yourself(name) : name;
    to.append(option);
  }
  const type = $("#send-type");
  for (const value of [...TYPES, ""]) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = value ? T.categories[value] : T.noType;
    type.append(option);
  }
  $("#send-title").value = T.defaultTitle;
  $("#send-content").value = T.defaultContent;
  form.hidden = false;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const frame = {
      action: "demo_send",
      to: to.value,
      type: type.value || null,
      title: $("#send-title").value.trim(),
      content: $("#send-content").value.trim() || null,
      skipUrl: $("#send-url").value.trim() || null,
    };
    sendStatus(T.sending);
    client.send(frame).then(
      () => sendStatus(T.sent(frame.to)),
      (error) => sendStatus(T.notSent(error.message), true),
    );
  });
}

function sendStatus(text, failed = false) {
  const status = $("#send-status");
  status.textContent = text;
  status.classList.toggle("failed", failed);
}
