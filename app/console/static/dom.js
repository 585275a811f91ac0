// Small DOM helpers. Everything the API returns is put in the page as text (textContent), never
// as HTML, so a dataset called "<img onerror=...>" stays a name.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  return fill(el, attrs, children);
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  return fill(el, attrs, children);
}

function fill(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "text") {
      el.textContent = String(value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v < 10 && i > 0 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function pct(x, digits = 1) {
  return x === null || x === undefined ? "" : `${(100 * x).toFixed(digits)}%`;
}

export function badge(value, extra) {
  return h("span", { class: `badge ${value}${extra ? " " + extra : ""}`, text: String(value).replace(/_/g, " ") });
}

export function progressBar(percent, state, big) {
  const inner = h("div");
  inner.style.width = `${Math.max(0, Math.min(100, percent || 0)).toFixed(1)}%`;
  const cls = ["progress", big ? "big" : "", state === "succeeded" ? "done" : "", state === "failed" ? "failed" : ""];
  return h(
    "div",
    { class: cls.filter(Boolean).join(" "), role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(percent || 0) },
    inner,
  );
}

export function errorBox(err) {
  return h("div", { class: "error-box", role: "alert" }, describeError(err));
}

export function describeError(err) {
  if (err && err.problem) {
    const p = err.problem;
    const where = p.field ? ` (${p.field})` : "";
    return `${p.detail || p.title || "request failed"}${where} [${p.code || err.status}]`;
  }
  return err && err.message ? err.message : String(err);
}

// Replace an element's content (children as h() takes them: nested arrays, null skipped).
export function refill(el, ...children) {
  return append(clear(el), children);
}
