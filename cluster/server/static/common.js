// Shared by the dashboard and the chat page: the API key (asked for once, kept in this browser) and
// requests that carry it.
"use strict";

const KEY_STORAGE = "kimi-cluster-api-key";

function storedKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = storedKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

// The form that asks for the key, added to the page the first time it is needed.
function keyForm() {
  let form = document.getElementById("key-form");
  if (form) return form;
  form = element("form", {id: "key-form", class: "key", hidden: ""},
    element("div", {}, element("strong", {}, "API key"), element("p", {id: "key-note", class: "muted"}),
      element("input", {id: "api-key", type: "password", autocomplete: "current-password", placeholder: "API key"}),
      element("button", {type: "submit"}, "Use this key")));
  document.body.append(form);
  return form;
}

// Show the key form; `onKey` runs once a key has been entered and kept.
function askForKey(onKey, wrong) {
  const form = keyForm();
  const note = document.getElementById("key-note");
  note.textContent = wrong ? "That key was refused; enter the server's API key." :
    "This server asks for an API key. It is kept in this browser only.";
  form.hidden = false;
  document.getElementById("api-key").focus();
  form.onsubmit = (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, document.getElementById("api-key").value.trim());
    form.hidden = true;
    onKey();
  };
}

// fetch with the key; a 401 raises KeyRefused so callers can ask for one.
class KeyRefused extends Error {}

async function fetchWithKey(url, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = authHeaders(opts.headers);
  const response = await fetch(url, opts);
  if (response.status === 401) throw new KeyRefused(await response.text());
  return response;
}

function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit++; }
  return value.toFixed(value < 10 && unit > 0 ? 1 : 0) + " " + units[unit];
}

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined) continue;
    if (name === "class") node.className = value; else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
