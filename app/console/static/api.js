// The only door to the service: the public /v1 API, with the user's key when there is one.
// A 401 (no key yet, a wrong or revoked key) shows the key prompt and retries the request with
// the key entered; every request waiting at that moment shares the one prompt.

const KEY_ITEM = "lafter.apiKey";
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || null;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
  listeners.forEach((fn) => fn(key));
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
  listeners.forEach((fn) => fn(null));
}

export function onKeyChange(fn) {
  listeners.add(fn);
}

// "on" once the service asked for a key, "off" once it answered a request sent without one (the
// single-user mode), null until then.
let authMode = null;

export function getAuthMode() {
  return authMode;
}

function noteAuthMode(mode) {
  if (authMode === mode) return;
  authMode = mode;
  listeners.forEach((fn) => fn(getKey()));
}

let pendingPrompt = null;

function askForKey(problem) {
  if (pendingPrompt) return pendingPrompt;
  noteAuthMode("on");
  const overlay = document.getElementById("key-overlay");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const message = document.getElementById("key-message");
  const hadKey = Boolean(getKey());
  message.textContent = hadKey
    ? `The key was refused: ${(problem && problem.detail) || "not valid"}. Enter another one.`
    : "This service needs an API key.";
  message.classList.toggle("refused", hadKey);
  input.value = "";
  overlay.hidden = false;
  input.focus();
  pendingPrompt = new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      form.removeEventListener("submit", submit);
      overlay.hidden = true;
      setKey(key);
      pendingPrompt = null;
      resolve(key);
    };
    form.addEventListener("submit", submit);
  });
  return pendingPrompt;
}

// api("/v1/jobs", {method: "POST", json: {...}}) -> parsed JSON (null for 204).
// {form: FormData} sends multipart; {raw: true} returns the Response (for images; pass
// cache: "default" to let the browser keep them by their Cache-Control).
export async function api(path, options = {}) {
  const { method = "GET", json, form, raw = false, signal, cache = "no-cache" } = options;
  for (;;) {
    const headers = { Accept: "application/json" };
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    const response = await fetch(path, { method, headers, body, signal, cache });
    if (response.status === 401) {
      const problem = await response.json().catch(() => null);
      await askForKey(problem);
      continue;
    }
    if (!key && response.ok && path.startsWith("/v1/")) noteAuthMode("off");
    if (raw && response.ok) return response;
    if (response.status === 204) return null;
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (err) {
      data = { detail: text.slice(0, 300) };
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

// Every page of a cursor-paginated list, up to `max` items.
export async function listAll(path, max = 500) {
  const out = [];
  let after = null;
  while (out.length < max) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    out.push(...page.data);
    if (!page.has_more || !page.next_cursor) break;
    after = page.next_cursor;
  }
  return out;
}
