// The chat page: streams /v1/chat/completions (SSE) from the server that served this page.
// No build step and nothing fetched from elsewhere: it works on an air-gapped machine.
// Conversations, settings and the API key stay in this browser's localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const PREFIX = "edge-infer.";
const store = {
  get(key, fallback) {
    try {
      const v = localStorage.getItem(PREFIX + key);
      return v === null ? fallback : JSON.parse(v);
    } catch (e) {
      return fallback;
    }
  },
  set(key, value) { localStorage.setItem(PREFIX + key, JSON.stringify(value)); },
  drop(key) { localStorage.removeItem(PREFIX + key); },
};

const state = { conversations: store.get("conversations", []), current: store.get("current", null), controller: null };

// ---- the API key: asked for when the server answers 401 ------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = store.get("apiKey", "");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function askKey(refused) {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-error").hidden = !refused;
    $("key-input").value = "";
    dialog.addEventListener("close", () => {
      store.set("apiKey", $("key-input").value.trim());
      resolve();
    }, { once: true });
    dialog.showModal();
  });
}

async function api(path, init) {
  for (let tries = 0; ; tries++) {
    const r = await fetch(path, Object.assign({}, init, { headers: headers() }));
    if (r.status !== 401 || tries >= 5) return r;
    await askKey(Boolean(store.get("apiKey", "")));
  }
}

async function errorText(r) {
  try {
    const body = await r.json();
    return (body.error && body.error.message) || r.statusText;
  } catch (e) {
    return r.status + " " + r.statusText;
  }
}

// ---- models and settings ---------------------------------------------------------------------

async function loadModels() {
  const r = await api("/v1/models");
  if (!r.ok) return setStatus("cannot list models: " + (await errorText(r)));
  const select = $("model");
  const chosen = store.get("model", "");
  select.replaceChildren();
  for (const m of (await r.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = m.id;
    option.selected = m.id === chosen;
    select.appendChild(option);
  }
}

const SETTINGS = { system: "system", temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens", extra: "extra" };

function loadSettings() {
  const saved = store.get("settings", {});
  for (const [key, id] of Object.entries(SETTINGS)) if (saved[key] !== undefined) $(id).value = saved[key];
}

function saveSettings() {
  const saved = {};
  for (const [key, id] of Object.entries(SETTINGS)) saved[key] = $(id).value;
  store.set("settings", saved);
}

function requestBody(conversation) {
  const body = { model: $("model").value, stream: true, stream_options: { include_usage: true } };
  const system = $("system").value.trim();
  body.messages = (system ? [{ role: "system", content: system }] : []).concat(
    conversation.messages.filter((m) => !m.pending && m.content).map((m) => ({ role: m.role, content: m.content })));
  const numbers = { temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens" };
  for (const [key, id] of Object.entries(numbers)) if ($(id).value !== "") body[key] = Number($(id).value);
  const extra = $("extra").value.trim();
  $("settings-error").hidden = true;
  if (extra) {
    let fields;
    try {
      fields = JSON.parse(extra);
    } catch (e) {
      fields = null;
    }
    if (!fields || typeof fields !== "object" || Array.isArray(fields)) {
      $("settings-error").textContent = "Extra request fields must be a JSON object.";
      $("settings-error").hidden = false;
      $("settings").open = true;
      return null;
    }
    Object.assign(body, fields);
  }
  return body;
}

// ---- conversations ---------------------------------------------------------------------------

function save() {
  store.set("conversations", state.conversations);
  store.set("current", state.current);
}

function current() {
  let c = state.conversations.find((x) => x.id === state.current);
  if (!c) {
    c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [] };
    state.conversations.unshift(c);
    state.current = c.id;
  }
  return c;
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of state.conversations) {
    const li = document.createElement("li");
    li.className = c.id === state.current ? "current" : "";
    const title = document.createElement("span");
    title.textContent = c.title;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Delete this conversation";
    remove.addEventListener("click", (e) => {
      e.stopPropagation();
      state.conversations = state.conversations.filter((x) => x.id !== c.id);
      if (state.current === c.id) state.current = null;
      save();
      renderAll();
    });
    li.append(title, remove);
    li.addEventListener("click", () => {
      if (state.controller) return;
      state.current = c.id;
      save();
      renderAll();
    });
    list.appendChild(li);
  }
}

// ---- messages ----------------------------------------------------------------------------------

function splitThinking(message) {
  // A server started with --reasoning-format none leaves <think>...</think> in the content.
  let { content, reasoning } = message;
  reasoning = reasoning || "";
  const m = /^\s*<think>([\s\S]*?)(<\/think>|$)/.exec(content || "");
  if (m) {
    reasoning += m[1];
    content = content.slice(m[0].length);
  }
  return { content: content || "", reasoning };
}

function messageNode(message) {
  const node = document.createElement("div");
  node.className = "msg " + message.role;
  if (message.role !== "assistant") {
    node.textContent = message.content;
    return node;
  }
  const { content, reasoning } = splitThinking(message);
  if (reasoning) {
    const details = document.createElement("details");
    details.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = message.pending && !content ? "Thinking…" : "Reasoning";
    details.append(summary, renderMarkdown(reasoning));
    node.appendChild(details);
  }
  node.appendChild(renderMarkdown(content));
  for (const [cls, text] of [["stats", message.stats], ["note", message.stopped && "stopped"], ["error", message.error]]) {
    if (!text) continue;
    const line = document.createElement("div");
    line.className = cls;
    line.textContent = text;
    node.appendChild(line);
  }
  return node;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...current().messages.map(messageNode));
  box.scrollTop = box.scrollHeight;
}

function renderAll() {
  renderList();
  renderMessages();
}

let frame = 0;
function renderLast() {  // at most once per animation frame while a reply streams
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const box = $("messages");
    const messages = current().messages;
    const last = box.lastElementChild;
    if (last) {
      const open = last.querySelector("details.reasoning");
      const node = messageNode(messages[messages.length - 1]);
      const folded = node.querySelector("details.reasoning");
      if (open && folded) folded.open = open.open;  // keep the fold the user chose
      box.replaceChild(node, last);
    }
    box.scrollTop = box.scrollHeight;
  });
}

// ---- streaming -----------------------------------------------------------------------------------

async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function stats(reply, started, tokens) {
  const seconds = (performance.now() - started) / 1000;
  const n = reply.usage ? reply.usage.completion_tokens : tokens;
  return n + " tokens · " + (seconds > 0 ? (n / seconds).toFixed(1) : "–") + " tok/s";
}

async function send(text) {
  const conversation = current();
  conversation.messages.push({ role: "user", content: text });
  if (conversation.title === "New chat") conversation.title = text.slice(0, 40);
  const body = requestBody(conversation);
  if (!body) return conversation.messages.pop();
  const reply = { role: "assistant", content: "", reasoning: "", pending: true };
  conversation.messages.push(reply);
  save();
  renderAll();
  setBusy(new AbortController());
  let started = null;
  let tokens = 0;
  try {
    const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const event of sseEvents(r.body)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) reply.usage = event.usage;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (!delta) continue;
      if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
      if (delta.content) reply.content += delta.content;
      if (delta.content || delta.reasoning_content) {
        if (started === null) started = performance.now();
        tokens++;
        reply.stats = stats(reply, started, tokens);
        setStatus("generating: " + reply.stats);
      }
      renderLast();
    }
    if (started !== null) reply.stats = stats(reply, started, tokens);
    setStatus(reply.stats || "");
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = String(e.message || e);
    setStatus(reply.stopped ? "stopped" : "error");
  } finally {
    delete reply.pending;
    setBusy(null);
    save();
    renderAll();
  }
}

function setBusy(controller) {
  state.controller = controller;
  $("send").hidden = Boolean(controller);
  $("stop").hidden = !controller;
  document.body.classList.toggle("busy", Boolean(controller));
}

function setStatus(text) { $("status").textContent = text; }

// ---- wiring ----------------------------------------------------------------------------------------

function submit() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  $("input").value = "";
  send(text);
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) return;
    state.current = null;
    current();
    save();
    renderAll();
  });
  $("model").addEventListener("change", () => store.set("model", $("model").value));
  for (const id of Object.values(SETTINGS)) $(id).addEventListener("change", saveSettings);
  $("forget-key").addEventListener("click", () => store.drop("apiKey"));
}

window.addEventListener("DOMContentLoaded", () => {
  wire();
  loadSettings();
  renderAll();
  loadModels().then(() => document.body.classList.add("ready"));
});
