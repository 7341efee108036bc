// The chat page: a conversation streamed from POST /v1/chat/completions, reasoning folded, tool calls shown.
"use strict";

const messages = [];  // the conversation as the API takes it
let running = null;  // the AbortController of the reply being streamed

const conversation = document.getElementById("conversation");
const promptBox = document.getElementById("prompt");

async function showModel() {
  try {
    const response = await fetchWithKey("/v1/models");
    const card = (await response.json()).data[0];
    document.getElementById("model").textContent = card.id + " · " + card.context_length + " tokens of context";
  } catch (error) {
    if (error instanceof KeyRefused) askForKey(showModel, storedKey() !== "");
  }
}

function numberSetting(id) {
  const value = document.getElementById(id).value;
  return value === "" ? undefined : Number(value);
}

function requestBody() {
  const system = document.getElementById("system").value.trim();
  const body = {
    messages: (system ? [{role: "system", content: system}] : []).concat(messages),
    stream: true, stream_options: {include_usage: true},
  };
  for (const id of ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed"]) {
    const value = numberSetting(id);
    if (value !== undefined) body[id] = value;
  }
  const tools = document.getElementById("tools").value.trim();
  if (tools) body.tools = JSON.parse(tools);
  return body;
}

function addBubble(role, text) {
  const bubble = element("div", {class: "message " + role}, text);
  conversation.append(bubble);
  conversation.scrollTop = conversation.scrollHeight;
  return bubble;
}

// The assistant's bubble: folded reasoning, the answer, tool calls, and a line of stats at the end.
class Reply {
  constructor() {
    this.reasoning = ""; this.content = ""; this.calls = [];
    this.bubble = addBubble("assistant", "");
    this.thinking = element("details", {class: "reasoning", hidden: ""}, element("summary", {}, "Reasoning"),
      element("div"));
    this.text = element("div", {class: "content"});
    this.tools = element("div");
    this.bubble.append(this.thinking, this.text, this.tools);
  }

  add(delta) {
    if (delta.reasoning_content) {
      this.reasoning += delta.reasoning_content;
      this.thinking.hidden = false;
      this.thinking.lastChild.textContent = this.reasoning;
    }
    if (delta.content) {
      this.content += delta.content;
      this.text.textContent = this.content;
    }
    for (const call of delta.tool_calls || []) {
      const kept = this.calls[call.index] = this.calls[call.index] ||
        {id: call.id, type: "function", function: {name: "", arguments: ""}};
      if (call.function && call.function.name) kept.function.name += call.function.name;
      if (call.function && call.function.arguments) kept.function.arguments += call.function.arguments;
    }
    this.tools.replaceChildren(...this.calls.map((call) =>
      element("div", {class: "tool-call"}, "tool call: " + call.function.name + "(" + call.function.arguments + ")")));
    conversation.scrollTop = conversation.scrollHeight;
  }

  finish(stats) {
    this.bubble.append(element("div", {class: "stats"}, stats));
    const message = {role: "assistant", content: this.content};
    if (this.calls.length) message.tool_calls = this.calls;
    messages.push(message);
  }
}

async function send(text) {
  messages.push({role: "user", content: text});
  addBubble("user", text);
  const reply = new Reply();
  running = new AbortController();
  setRunning(true);
  const started = performance.now();
  let firstAt = null, usage = null, finish = null;
  try {
    const response = await fetchWithKey("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(requestBody()),
      signal: running.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const event of serverEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (firstAt === null) firstAt = performance.now();
        reply.add(choice.delta || {});
        finish = choice.finish_reason || finish;
      }
    }
  } catch (error) {
    if (error instanceof KeyRefused) {
      messages.pop();
      reply.bubble.remove();
      askForKey(() => {}, storedKey() !== "");
    } else if (error.name !== "AbortError") {
      reply.bubble.classList.add("error");
      reply.text.textContent = reply.content + "\n" + error.message;
    }
  } finally {
    setRunning(false);
  }
  if (reply.bubble.isConnected) reply.finish(stats(started, firstAt, usage, finish));
}

function stats(started, firstAt, usage, finish) {
  const parts = [];
  if (firstAt !== null) parts.push("first token after " + ((firstAt - started) / 1000).toFixed(2) + " s");
  if (usage) {
    const seconds = (performance.now() - (firstAt || started)) / 1000;
    parts.push(usage.completion_tokens + " tokens");
    if (usage.completion_tokens > 1) parts.push(((usage.completion_tokens - 1) / seconds).toFixed(1) + " tokens/s");
  }
  parts.push(finish ? "ended: " + finish : "stopped");
  return parts.join(" · ");
}

// The JSON of each "data:" line of a server-sent event stream, up to [DONE].
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (true) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ")) continue;
      if (line === "data: [DONE]") return;
      yield JSON.parse(line.slice(6));
    }
  }
}

function setRunning(isRunning) {
  document.getElementById("send").disabled = isRunning;
  document.getElementById("stop").disabled = !isRunning;
  if (!isRunning) running = null;
}

document.getElementById("composer").onsubmit = (event) => {
  event.preventDefault();
  const text = promptBox.value.trim();
  if (!text || running) return;
  promptBox.value = "";
  send(text);
};
promptBox.onkeydown = (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    document.getElementById("composer").requestSubmit();
  }
};
document.getElementById("stop").onclick = () => running && running.abort();
document.getElementById("new-chat").onclick = (event) => {
  event.preventDefault();
  if (running) running.abort();
  messages.length = 0;
  conversation.replaceChildren();
};

showModel();
