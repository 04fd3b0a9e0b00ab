// dllama chat page: keeps the conversation in memory, streams each answer from
// /v1/chat/completions (Server-Sent Events), and can stop a generation or start over.
// Model text is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), empty: $("empty"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), error: $("error"), stats: $("stats"), model: $("model"), health: $("health"),
  system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  settings: $("settings"), composer: $("composer"),
};

let conversation = [];   // [{role, content}] sent with every request
let running = null;      // AbortController of the generation in flight
let modelId = null;  // from /v1/models; until then requests name no model (the server's own)

ui.apiKey.value = localStorage.getItem("dllama-api-key") || "";
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem("dllama-api-key", ui.apiKey.value);
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (ui.apiKey.value) h["Authorization"] = "Bearer " + ui.apiKey.value;
  return h;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const div = document.createElement("div");
  div.className = "message " + role;
  div.dataset.role = role;
  div.textContent = text;
  ui.messages.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setRunning(controller) {
  running = controller;
  ui.send.disabled = controller !== null;
  ui.stop.disabled = controller === null;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return response.status + " " + response.statusText;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      ui.settings.open = true;
      ui.model.textContent = "enter the API key in Settings";
      return;
    }
    const body = await response.json();
    modelId = body.data[0].id;
    ui.model.textContent = modelId;
  } catch (e) {
    ui.model.textContent = "server unreachable";
  }
}

async function checkHealth() {
  try {
    const response = await fetch("/health");
    const body = await response.json();
    ui.health.textContent = body.model_loaded
      ? `${body.nodes} node${body.nodes === 1 ? "" : "s"}, context ${body.context}`
      : "unavailable: " + (body.error || "loading");
  } catch (e) {
    ui.health.textContent = "server unreachable";
  }
}

// Yields the JSON payload (or "[DONE]") of each `data:` event in a fetch response body.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function send(text) {
  showError("");
  const system = ui.system.value.trim();
  const turns = conversation;  // "New conversation" during this answer replaces it, leaving this one behind
  if (turns.length === 0 && system) turns.push({ role: "system", content: system });
  turns.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const controller = new AbortController();
  setRunning(controller);

  const request = { ...(modelId ? { model: modelId } : {}), messages: turns, stream: true,
                    stream_options: { include_usage: true } };
  if (ui.temperature.value !== "") request.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value !== "") request.max_tokens = Number(ui.maxTokens.value);

  let answer = "";
  let note = "";
  const started = performance.now();
  let firstToken = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of serverEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (firstToken === null) firstToken = performance.now();
        answer += choice.delta.content;
        bubble.textContent = answer;
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason === "length") note = "(stopped at the token limit)";
    }
  } catch (e) {
    if (e.name === "AbortError") note = "(stopped)";
    else {
      showError(e.message);
      note = "(failed)";
    }
  } finally {
    bubble.classList.remove("streaming");
    if (note) {
      const span = document.createElement("span");
      span.className = "note";
      span.textContent = note;
      bubble.appendChild(span);
    }
    setRunning(null);
  }
  // the answer, even a partial one, stays in the conversation so the next turn follows it
  turns.push({ role: "assistant", content: answer });
  if (usage && firstToken !== null) {
    const seconds = (performance.now() - firstToken) / 1000;
    const rate = usage.completion_tokens > 1 && seconds > 0 ? (usage.completion_tokens - 1) / seconds : 0;
    ui.stats.textContent = `${usage.prompt_tokens} prompt tokens, ${usage.completion_tokens} generated, ` +
      `first token after ${((firstToken - started) / 1000).toFixed(2)} s, ${rate.toFixed(1)} tokens/s`;
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || running) return;
  ui.prompt.value = "";
  send(text);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => { if (running) running.abort(); });

ui.newChat.addEventListener("click", () => {
  if (running) running.abort();
  conversation = [];
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.stats.textContent = "";
  showError("");
  ui.prompt.focus();
});

loadModel();
checkHealth();
setInterval(checkHealth, 10000);
ui.prompt.focus();
