// The demo message center: a bell with the unread count, the inbox (history
// on load, live messages on top, "load more"), toasts, mark read. Everything
// it knows comes from notifyd.js. `notifyd demo` serves it at /?user=<name>
// with that demo user's token in <meta name="notifyd-demo"> and a form that
// sends to the demo users; elsewhere open it as /demo#token=<JWT>.
import { createClient } from "./notifyd.js";

const $ = (selector) => document.querySelector(selector);
const svg = (path) =>
  `<svg viewBox="0 0 24 24" aria-hidden="true"><path d="${path}" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"/></svg>`;
const ICON_LINK = svg("M14 4h6v6M20 4l-9 9M18 14v5a1 1 0 0 1-1 1H5a1 1 0 0 1-1-1V7a1 1 0 0 1 1-1h5");
const ICON_CLOSE = svg("M6 6l12 12M18 6 6 18");

const params = new URLSearchParams(location.hash.slice(1));
const demo = demoConfig();
const token = demo?.token ?? params.get("token");

if (!token) {
  $(".bell-wrap").hidden = true;
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

function start(jwt) {
  const user = tokenUser(jwt);
  const client = createClient({ token: () => jwt, shareKey: `demo:${user || jwt}` });
  window.notifydClient = client; // for the console, and the browser tests

  const messages = new Map(); // id -> message
  let more = false;
  let loaded = false;
  let generation = 0; // a reload makes answers to earlier requests stale

  const list = $("#list");
  const badge = $("#badge");
  const bell = $("#bell");

  $("#intro").hidden = false;
  if (demo) setUpDemo(client, user);

  // The dropdown: the bell toggles it; Escape or a click elsewhere closes it.
  const panel = $("#panel");
  const setOpen = (open) => {
    panel.hidden = !open;
    bell.setAttribute("aria-expanded", String(open));
  };
  bell.addEventListener("click", () => setOpen(panel.hidden));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !panel.hidden) {
      setOpen(false);
      bell.focus();
    }
  });
  document.addEventListener("click", (event) => {
    if (!panel.hidden && !event.target.closest?.(".bell-wrap")) setOpen(false);
  });
  $("#mark-all").addEventListener("click", () => client.markAllRead().catch(showError));
  $("#more").addEventListener("click", () => loadMore());

  client.on("state", ({ state }) => {
    const status = $("#status");
    status.dataset.state = state;
    status.textContent = {
      connecting: "connecting…",
      open: "live",
      reconnecting: "reconnecting…",
      replaced: "replaced by a newer session",
      unauthorized: "token refused",
      closed: "closed",
    }[state] ?? state;
    if (state === "open" && !loaded) reload();
  });
  client.on("hello", ({ user: helloUser }) => {
    $("#who").textContent = helloUser ? `Signed in as ${helloUser}` : "";
  });
  // Errors that answer no request, e.g. a refused demo_send.
  client.on("error", ({ code, message }) => {
    if (demo) sendStatus(`Not sent: ${message} (${code})`, true);
    showError(new Error(`${code}: ${message}`));
  });
  client.on("unread", ({ count }) => {
    badge.textContent = count > 99 ? "99+" : String(count);
    badge.hidden = count === 0;
    const label = count === 1 ? "1 unread message" : `${count} unread messages`;
    bell.setAttribute("aria-label", `Messages, ${label}`);
    $("#announce").textContent = label;
  });
  client.on("message", (message) => {
    messages.set(message.id, message);
    render();
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

  function reload({ clear = false } = {}) {
    loaded = true;
    const current = ++generation;
    if (clear) {
      messages.clear();
      render();
    }
    client.history({ limit: 20 }).then(
      (page) => {
        if (current !== generation) return;
        for (const message of page.messages) messages.set(message.id, message);
        more = page.more;
        render();
      },
      (error) => {
        if (current === generation) loaded = false; // try again at the next "open"
        showError(error);
      },
    );
  }

  function loadMore() {
    const listed = [...messages.values()];
    const oldest = listed.length ? listed.reduce((a, b) => (seqOf(a) <= seqOf(b) ? a : b)) : null;
    const current = generation;
    client.history({ limit: 20, before: oldest ? `~${seqOf(oldest)}` : null }).then((page) => {
      if (current !== generation) return;
      for (const message of page.messages) messages.set(message.id, message);
      more = page.more;
      render();
    }, showError);
  }

  function render() {
    const sorted = [...messages.values()].sort((a, b) => seqOf(b) - seqOf(a));
    list.replaceChildren(...sorted.map(item));
    $("#empty").hidden = sorted.length > 0;
    $("#more").hidden = !more;
  }

  function item(message) {
    const unread = message.isRead !== "1";
    const li = document.createElement("li");
    li.className = unread ? "msg unread" : "msg";
    li.dataset.id = message.id;

    const body = document.createElement("button");
    body.type = "button";
    body.className = "msg-body";
    const dot = document.createElement("span");
    dot.className = "dot";
    const title = document.createElement("span");
    title.className = "msg-title";
    title.textContent = message.title;
    if (unread) {
      const hint = document.createElement("span");
      hint.className = "visually-hidden";
      hint.textContent = "Unread: ";
      title.prepend(hint);
    }
    const time = document.createElement("time");
    time.className = "msg-time";
    time.dateTime = message.sendTime;
    time.textContent = formatTime(message.sendTime);
    const content = document.createElement("span");
    content.className = "msg-content";
    content.textContent = message.content;
    body.append(dot, title, time, content);
    body.addEventListener("click", () => {
      if (message.isRead !== "1") client.markRead([message.id]).catch(showError);
    });
    li.append(body);

    if (message.skipUrl) {
      // The server passes only http(s) URLs and /paths: safe as a link.
      const link = document.createElement("a");
      link.className = "msg-link";
      link.href = message.skipUrl;
      link.rel = "noopener";
      link.innerHTML = ICON_LINK;
      link.append(document.createTextNode(" Open"));
      link.addEventListener("click", () => client.markRead([message.id]).catch(showError));
      li.append(link);
    }
    return li;
  }

  function toast(message) {
    const box = document.createElement("div");
    box.className = "toast";
    const title = document.createElement("strong");
    title.textContent = message.title;
    const content = document.createElement("p");
    content.textContent = message.content;
    box.append(title, content);
    if (message.skipUrl) {
      const link = document.createElement("a");
      link.href = message.skipUrl;
      link.rel = "noopener";
      link.textContent = "Open";
      box.append(link);
    }
    const close = document.createElement("button");
    close.type = "button";
    close.className = "toast-close";
    close.setAttribute("aria-label", "Dismiss");
    close.innerHTML = ICON_CLOSE;
    close.addEventListener("click", () => box.remove());
    box.append(close);
    $("#toasts").append(box);
    while ($("#toasts").children.length > 4) $("#toasts").firstElementChild.remove();
    setTimeout(() => box.remove(), 8000);
  }

  function formatTime(value) {
    const date = new Date(value);
    return Number.isNaN(date.getTime()) ? "" : date.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  }

  function showError(error) {
    console.warn("notifyd demo:", error);
  }
}

// The demo's extras: who this page is, links to the other demo users' pages,
// and a form that sends them a message (the demo-only demo_send action, a
// plain INSERT on the server, delivered like any other row).
function setUpDemo(client, user) {
  const others = demo.users.filter((name) => name !== user);
  document.title = `${demo.user} · My messages · notifyd demo`;
  const nav = $("#users");
  const you = document.createElement("p");
  you.append("You are ");
  const strong = document.createElement("strong");
  strong.textContent = demo.user;
  you.append(strong, ". Open the page of ");
  others.forEach((name, index) => {
    const link = document.createElement("a");
    link.href = `?user=${encodeURIComponent(name)}`;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = name;
    if (index) you.append(index === others.length - 1 ? " or " : ", ");
    you.append(link);
  });
  you.append(" in another window, or ");
  const again = document.createElement("a");
  again.href = `?user=${encodeURIComponent(demo.user)}`;
  again.target = "_blank";
  again.rel = "noopener";
  again.textContent = `${demo.user}'s again`;
  you.append(again, ".");
  nav.replaceChildren(you);
  nav.hidden = false;

  const form = $("#send");
  const to = $("#send-to");
  for (const name of [...others, demo.user]) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name === demo.user ? `${name} (you)` : name;
    to.append(option);
  }
  form.hidden = false;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const frame = {
      action: "demo_send",
      to: to.value,
      title: $("#send-title").value.trim(),
      content: $("#send-content").value.trim() || null,
      skipUrl: $("#send-url").value.trim() || null,
    };
    sendStatus("Sending…");
    client.send(frame).then(
      () => sendStatus(`Sent to ${frame.to}.`),
      (error) => sendStatus(`Not sent: ${error.message}`, true),
    );
  });
}

function sendStatus(text, failed = false) {
  const status = $("#send-status");
  status.textContent = text;
  status.classList.toggle("failed", failed);
}
