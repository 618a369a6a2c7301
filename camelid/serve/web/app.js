// The camelid chat page: plain JS over the server's HTTP API, no build step, no external assets.
// State lives on the server (sessions); the page keeps only the API key, settings and the open session in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get: (k, d = "") => localStorage.getItem("camelid." + k) ?? d,
  set: (k, v) => localStorage.setItem("camelid." + k, v),
  del: (k) => localStorage.removeItem("camelid." + k),
};
// sessions: false when the server keeps no history (started without a database): the page keeps it, unsaved
// renaming: a session's title is being edited (the list waits: redrawing it would end the edit)
const state = { sessionId: store.get("session") || null, aborter: null, sessions: true, history: [], renaming: false };

// ---- HTTP -------------------------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// fetch and a body's reads fail with a bare TypeError ("Failed to fetch", "network error") when the server is down
// or the network fails: say so in words
const offline = (err) => (err instanceof TypeError ?
  new ApiError(0, `No connection to the server (${err.message}).`) : err);

async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init).catch((err) => { throw offline(err); });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new ApiError(res.status, (data.error && data.error.message) || res.statusText);
  return data;
}

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function needKey(err) {
  if (err.status !== 401) return false;
  $("settings").open = true;
  $("api-key").focus();
  say($("api-key").value.trim() ? "The server did not accept this API key: check it under Settings."
                                 : "This server needs an API key: enter it under Settings.", true);
  return true;
}

// ---- models -----------------------------------------------------------------------------------------------------

async function loadModels() {
  const { data } = await api("GET", "/v1/models");
  const select = $("model");
  const wanted = store.get("model");
  select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
  if (data.some((m) => m.id === wanted)) select.value = wanted;
}

const NO_MODEL = "The server has no models right now (its workers may be restarting): try again shortly.";

// ---- sessions ---------------------------------------------------------------------------------------------------

async function loadSessions() {
  if (!state.sessions || state.renaming) return;
  let data;
  try {
    ({ data } = await api("GET", "/v1/sessions"));
  } catch (err) {
    if (err.status !== 404) throw err;
    state.sessions = false;
    $("sessions").replaceChildren();
    $("sessions-heading").textContent = "Sessions are off on this server: this chat is not saved";
    return;
  }
  const list = $("sessions");
  list.replaceChildren(...data.map(sessionItem));
  if (state.sessionId && !data.some((s) => s.id === state.sessionId)) openSession(null);
}

function sessionItem(session) {
  const li = document.createElement("li");
  li.dataset.id = session.id;
  li.classList.toggle("current", session.id === state.sessionId);
  const open = document.createElement("button");
  open.type = "button";
  open.className = "session-title";
  open.dir = "auto";
  open.textContent = session.title || "Untitled";
  if (session.id === state.sessionId) open.setAttribute("aria-current", "true");
  open.addEventListener("click", () => openSession(session.id));
  const rename = document.createElement("button");
  rename.type = "button";
  rename.className = "rename";
  rename.textContent = "Rename";
  rename.setAttribute("aria-label", `Rename "${open.textContent}"`);
  rename.addEventListener("click", () => startRename(li, session));
  const del = document.createElement("button");
  del.type = "button";
  del.className = "delete";
  del.textContent = "Delete";
  del.setAttribute("aria-label", `Delete "${open.textContent}"`);
  del.addEventListener("click", () => deleteSession(session.id));
  li.append(open, rename, del);
  return li;
}

function startRename(li, session) {
  const input = document.createElement("input");
  input.type = "text";
  input.className = "rename-input";
  input.value = session.title || "";
  input.setAttribute("aria-label", "New title (Enter saves, Escape cancels)");
  li.replaceChildren(input);
  input.focus();
  input.select();
  state.renaming = true;
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    state.renaming = false;
    try {
      if (save && input.value.trim()) await api("PATCH", `/v1/sessions/${session.id}`, { title: input.value.trim() });
    } catch (err) { say(err.message, true); }
    await loadSessions();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteSession(id) {
  try {
    await api("DELETE", `/v1/sessions/${id}`);
    if (id === state.sessionId) openSession(null);
    await loadSessions();
    say("Session deleted.");
  } catch (err) { say(err.message, true); }
}

async function openSession(id) {
  if (id && id === state.sessionId && state.aborter) return;  // its answer is streaming in: the log is current
  state.history = [];
  if (!state.sessions) id = null;
  state.sessionId = id;
  if (id) store.set("session", id); else store.del("session");
  $("log").replaceChildren();
  document.querySelectorAll("#sessions li").forEach((li) => {
    li.classList.toggle("current", li.dataset.id === id);
    const title = li.querySelector(".session-title");
    if (title) title.toggleAttribute("aria-current", li.dataset.id === id);
  });
  if (!id) { $("system-prompt").value = store.get("system"); return; }
  try {
    const session = await api("GET", `/v1/sessions/${id}`);
    if (state.sessionId !== id) return;  // another session was opened while this one loaded: that one shows
    $("system-prompt").value = session.system_prompt || "";
    const served = [...$("model").options].some((o) => o.value === session.model);
    if (session.model && served) $("model").value = session.model;
    for (const m of session.messages) if (m.role !== "system") addMessage(m.role, m.content);
  } catch (err) {
    if (state.sessionId !== id) return;
    if (err.status === 404) openSession(null); else say(err.message, true);
  }
}

// ---- the conversation -------------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "content";
  body.dir = "auto";  // each message runs in the direction of its own text (Hebrew, Arabic: right to left)
  body.textContent = text;
  div.append(who, body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

// Reads an SSE body ("data: {json}\n\n" ... "data: [DONE]") and calls onEvent with each parsed JSON object.
async function readSSE(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read().catch((err) => { throw offline(err); });
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") return;
        onEvent(JSON.parse(payload));
      }
    }
  }
}

async function ensureSession(firstMessage) {
  if (state.sessionId) return state.sessionId;
  const chars = [...firstMessage];  // by code point: half of an emoji's surrogate pair is not text (the server's 400)
  const title = chars.length > 40 ? chars.slice(0, 40).join("") + "…" : firstMessage;
  const session = await api("POST", "/v1/sessions", {
    title, model: $("model").value, system_prompt: $("system-prompt").value.trim() || null,
  });
  state.sessionId = session.id;
  store.set("session", session.id);
  await loadSessions();
  return session.id;
}

// Sends one message and streams the answer in. A request the server refuses (bad key, too long, busy, unreachable)
// throws, with its bubbles removed: it is not part of the chat (the server stored nothing), and the caller puts the
// text back into the box.
async function send(text) {
  if (!$("model").value) await loadModels();  // none when the page opened: ask again
  if (!$("model").value) throw new ApiError(503, NO_MODEL);
  const turn = { role: "user", content: text };
  const history = state.history;  // this chat's: "New chat" while the answer streams starts another
  const body = { model: $("model").value, stream: true, temperature: Number($("temperature").value) };
  const fresh = state.sessions && !state.sessionId;  // a session is made for this message
  if (state.sessions) {  // the server prepends the session's system prompt and history
    body.session_id = await ensureSession(text);
    body.messages = [turn];
  } else {
    const system = $("system-prompt").value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), ...history, turn];
  }
  const question = addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.parentElement.setAttribute("aria-busy", "true");
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  state.aborter = new AbortController();
  let streaming = false;
  // the server's rule for what a session keeps: a finished or stopped answer, not one that failed
  const keep = () => { if (!state.sessions) history.push(turn, { role: "assistant", content: answer.textContent }); };
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                      signal: state.aborter.signal })
      .catch((err) => { throw offline(err); });
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new ApiError(res.status, (data.error && data.error.message) || res.statusText);
    }
    streaming = true;
    await readSSE(res, (event) => {
      if (event.error) throw new ApiError(500, event.error.message);
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        const log = $("log");  // follow the answer only from the log's end: not while the user reads further up
        const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
        answer.textContent += delta.content;
        if (atEnd) log.scrollTop = log.scrollHeight;
      }
    });
    keep();
    say("");
  } catch (err) {
    if (err.name === "AbortError") { keep(); say("Stopped."); }
    else if (!streaming) {
      question.parentElement.remove();
      answer.parentElement.remove();
      if (fresh) {  // nor is the session made for it (named after it, empty)
        await api("DELETE", `/v1/sessions/${body.session_id}`).catch(() => {});
        if (state.sessionId === body.session_id) openSession(null);
      }
      throw err;
    }
    else if (!needKey(err)) say(err.message, true);
  } finally {
    answer.parentElement.removeAttribute("aria-busy");
    state.aborter = null;
    loadSessions().catch(() => {});
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// ---- wiring -----------------------------------------------------------------------------------------------------

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || $("send").disabled) return;
  $("prompt").value = "";
  setBusy(true);  // at once: creating the session comes first
  try {
    await send(text);
  } catch (err) {  // refused: the message goes back into the box (unless the user typed another meanwhile)
    if (!$("prompt").value) $("prompt").value = text;
    if (!needKey(err)) say(err.message, true);
  } finally { setBusy(false); }
  // back to the message box, unless the user went on typing elsewhere meanwhile (a rename, the system prompt)
  if (!document.activeElement.matches("input, textarea, select")) $("prompt").focus();
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.aborter && state.aborter.abort());
$("new-session").addEventListener("click", () => { openSession(null); $("prompt").focus(); });
$("model").addEventListener("change", () => {
  store.set("model", $("model").value);
  if (state.sessionId) api("PATCH", `/v1/sessions/${state.sessionId}`, { model: $("model").value }).catch(() => {});
});
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = $("temperature").value;
  store.set("temperature", $("temperature").value);
});
$("max-tokens").addEventListener("change", () => store.set("max_tokens", $("max-tokens").value));
$("system-prompt").addEventListener("change", async () => {
  const system = $("system-prompt").value.trim();
  if (!state.sessionId) { store.set("system", system); return; }
  try {
    await api("PATCH", `/v1/sessions/${state.sessionId}`, { system_prompt: system });
    say("System prompt saved for this session.");
  } catch (err) { say(err.message, true); }
});
$("api-key").addEventListener("change", () => {
  store.set("api_key", $("api-key").value.trim());
  start();
});

async function start() {
  try {
    await loadModels();
    await loadSessions();
    await openSession(state.sessionId);
    if ($("model").value) say(""); else say(NO_MODEL, true);
  } catch (err) {
    if (!needKey(err)) say(err.message, true);
  }
}

$("api-key").value = store.get("api_key");
$("temperature").value = store.get("temperature", "0.7");
$("temperature-value").textContent = $("temperature").value;
$("max-tokens").value = store.get("max_tokens");
start();
