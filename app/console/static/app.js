// The console: a hash-routed single page app on the public /v1 API.

import { forgetKey, getAuthMode, getKey, onKeyChange } from "./api.js";
import * as datasets from "./datasets.js";
import { clear, errorBox, h, refill } from "./dom.js";
import * as jobs from "./jobs.js";
import * as models from "./models.js";

const ROUTES = [
  [/^\/datasets\/?$/, datasets.list, "datasets"],
  [/^\/datasets\/([^/]+)$/, datasets.detail, "datasets"],
  [/^\/jobs\/?$/, jobs.list, "jobs"],
  [/^\/jobs\/new$/, jobs.create, "jobs"],
  [/^\/jobs\/([^/]+)$/, jobs.detail, "jobs"],
  [/^\/models\/?$/, models.list, "models"],
  [/^\/models\/([^/]+)$/, models.detail, "models"],
];

// What one page owns while it is shown: its timers and object URLs, released when the user leaves.
class Page {
  constructor() {
    this.active = true;
    this.timers = new Set();
    this.urls = [];
  }

  // Runs fn now and then every `ms` after it finishes (never two at once), while the page is shown
  // and until fn returns false.
  every(ms, fn) {
    const tick = async () => {
      if (!this.active) return;
      let again = true;
      try {
        again = (await fn()) !== false;
      } catch (err) {
        console.warn("poll failed", err);
      }
      if (this.active && again) {
        const id = setTimeout(() => { this.timers.delete(id); tick(); }, ms);
        this.timers.add(id);
      }
    };
    tick();
  }

  objectUrl(blob) {
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }

  dispose() {
    this.active = false;
    this.timers.forEach((id) => clearTimeout(id));
    this.urls.forEach((url) => URL.revokeObjectURL(url));
  }
}

let current = null;

async function route() {
  const root = document.getElementById("view");
  const hash = location.hash.replace(/^#/, "") || "/datasets";
  const [path, query] = hash.split("?");
  if (current) current.dispose();
  const page = (current = new Page());
  page.query = new URLSearchParams(query || "");
  clear(root);
  for (const [pattern, view, section] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === section));
    root.append(h("div", { class: "loading", text: "Loading…" }));
    try {
      const content = await view(page, ...match.slice(1).map(decodeURIComponent));
      if (page.active) refill(root, content);
    } catch (err) {
      if (page.active) refill(root, errorBox(err));
    }
    return;
  }
  root.append(h("div", { class: "card empty" }, "No such page. ", h("a", { href: "#/datasets", text: "Go to datasets" })));
}

function renderSession() {
  const el = document.getElementById("session");
  clear(el);
  const key = getKey();
  if (key) {
    el.append(
      h("span", { class: "mono", title: "the API key this tab uses", text: `key ${key.slice(0, 8)}…` }),
      h("button", { type: "button", id: "forget-key", text: "Forget key", onclick: () => { forgetKey(); route(); } }),
    );
  } else if (getAuthMode() === "off") {
    el.append(h("span", { title: "the service answers without a key (single-user mode)", text: "no key needed" }));
  }
}

onKeyChange(renderSession);
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  renderSession();
  route();
});

