// Charts as inline SVG built here (no chart library): line charts, a stacked share chart (the
// pseudo-label histogram over time) and horizontal bars.

import { h, s } from "./dom.js";

export const PALETTE = [
  "#2f5bea", "#e8590c", "#1a9c5b", "#c2255c", "#7048e8", "#0c8599", "#e0a800", "#5c6b80",
  "#f783ac", "#74b816", "#845ef7", "#f03e3e",
];

export function color(i) {
  return PALETTE[i % PALETTE.length];
}

// Round numbers for axis ticks between lo and hi.
function ticks(lo, hi, count = 4) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => raw <= x) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function label(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
  return String(+v.toPrecision(4));
}

function frame(width, height, pad) {
  return {
    width, height, pad,
    x0: pad.left, x1: width - pad.right, y0: height - pad.bottom, y1: pad.top,
  };
}

function axes(svg, f, xs, ys, sx, sy, xTitle, yTitle, yFormat = label) {
  for (const t of ys) {
    const y = sy(t);
    svg.append(s("line", { class: "grid", x1: f.x0, x2: f.x1, y1: y, y2: y }));
    svg.append(s("text", { x: f.x0 - 6, y: y + 4, "text-anchor": "end", text: yFormat(t) }));
  }
  for (const t of xs) {
    const x = sx(t);
    svg.append(s("text", { x, y: f.y0 + 16, "text-anchor": "middle", text: label(t) }));
  }
  svg.append(s("line", { class: "axis", x1: f.x0, x2: f.x1, y1: f.y0, y2: f.y0 }));
  svg.append(s("line", { class: "axis", x1: f.x0, x2: f.x0, y1: f.y0, y2: f.y1 }));
  if (xTitle) svg.append(s("text", { x: (f.x0 + f.x1) / 2, y: f.height - 4, "text-anchor": "middle", text: xTitle }));
  if (yTitle) {
    svg.append(s("text", { x: 12, y: (f.y0 + f.y1) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(f.y0 + f.y1) / 2})`, text: yTitle }));
  }
}

function legend(items) {
  return h("div", { class: "legend" }, items.map((it) => {
    const swatch = h("i");
    swatch.style.background = it.color;
    return h("span", {}, swatch, it.name);
  }));
}

// series: [{name, points: [[x, y], ...]}]
export function lineChart(series, { width = 380, height = 220, xTitle = "step", yTitle = "" } = {}) {
  const pts = series.flatMap((se) => se.points);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "data-points": pts.length });
  const wrap = h("div", { class: "plot" }, svg);
  if (!pts.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle", text: "no points yet" }));
    return wrap;
  }
  const f = frame(width, height, { left: 48, right: 12, top: 10, bottom: 34 });
  let [xmin, xmax] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [ymin, ymax] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (xmax === xmin) { xmin -= 1; xmax += 1; }
  if (ymax === ymin) { const d = Math.abs(ymin) * 0.1 || 1; ymin -= d; ymax += d; }
  const padY = (ymax - ymin) * 0.08;
  ymin = Math.max(ymin >= 0 ? 0 : -Infinity, ymin - padY);
  ymax += padY;
  const sx = (x) => f.x0 + ((x - xmin) / (xmax - xmin)) * (f.x1 - f.x0);
  const sy = (y) => f.y0 - ((y - ymin) / (ymax - ymin)) * (f.y0 - f.y1);
  axes(svg, f, ticks(xmin, xmax, 5), ticks(ymin, ymax, 4), sx, sy, xTitle, yTitle);
  series.forEach((se, i) => {
    const c = se.color || color(i);
    if (se.points.length > 1) {
      const d = se.points.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
      svg.append(s("path", { d, fill: "none", stroke: c, "stroke-width": 2, "stroke-linejoin": "round", class: "series" }));
    }
    if (se.points.length <= 40) {
      for (const [x, y] of se.points) {
        svg.append(s("circle", { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 3, fill: c }, s("title", { text: `${se.name}: step ${x}, ${label(y)}` })));
      }
    }
  });
  if (series.length > 1) wrap.append(legend(series.map((se, i) => ({ name: se.name, color: se.color || color(i) }))));
  return wrap;
}

// The share of each class among the pseudo-labels of each logging window, stacked to 100%.
// steps: [x...], counts: [[count per class]...] (one row per step), classes: [names]
export function stackedShares(steps, counts, classes, { width = 380, height = 220 } = {}) {
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "data-points": steps.length });
  const wrap = h("div", { class: "plot" }, svg);
  if (!steps.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle", text: "no points yet" }));
    return wrap;
  }
  const f = frame(width, height, { left: 48, right: 12, top: 10, bottom: 34 });
  const shares = counts.map((row) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return row.map((v) => v / total);
  });
  // One window: a single stacked column; more: stacked areas between the windows' steps.
  const single = steps.length === 1;
  const xmin = single ? 0 : Math.min(...steps);
  const xmax = single ? 1 : Math.max(...steps);
  const sx = (x) => f.x0 + ((x - xmin) / (xmax - xmin || 1)) * (f.x1 - f.x0);
  const sy = (y) => f.y0 - y * (f.y0 - f.y1);
  axes(svg, f, single ? [] : ticks(xmin, xmax, 5), [0, 0.25, 0.5, 0.75, 1], sx, sy, single ? `step ${steps[0]}` : "step", "share", (t) => `${Math.round(t * 100)}%`);
  const xs = single ? [0, 1] : steps;
  const rows = single ? [shares[0], shares[0]] : shares;
  const base = xs.map(() => 0);
  classes.forEach((name, c) => {
    const top = rows.map((row, j) => base[j] + (row[c] || 0));
    const upper = xs.map((x, j) => `${sx(x).toFixed(1)},${sy(top[j]).toFixed(1)}`);
    const lower = xs.map((x, j) => `${sx(x).toFixed(1)},${sy(base[j]).toFixed(1)}`).reverse();
    svg.append(s("polygon", { points: [...upper, ...lower].join(" "), fill: color(c), "fill-opacity": 0.85, class: "series" }, s("title", { text: name })));
    top.forEach((v, j) => { base[j] = v; });
  });
  wrap.append(legend(classes.map((name, i) => ({ name, color: color(i) }))));
  return wrap;
}

// items: [{label, value (0..1 unless max is given), note?}]
export function bars(items, { max = 1, format = (v) => `${(100 * v).toFixed(1)}%`, width = 460, colorOf = () => PALETTE[0], highlight } = {}) {
  const row = 26;
  const labelW = Math.min(170, Math.max(70, 8 + 7 * Math.max(0, ...items.map((it) => String(it.label).length))));
  const height = Math.max(row, items.length * row) + 4;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "bars", width, "data-points": items.length });
  const valueW = 58;
  const barW = width - labelW - valueW - 8;
  items.forEach((it, i) => {
    const y = i * row + 2;
    const w = Math.max(1, (Math.max(0, it.value) / (max || 1)) * barW);
    const name = String(it.label);
    svg.append(s("text", { class: "bar-label", x: labelW - 8, y: y + 16, "text-anchor": "end", text: name.length > 24 ? name.slice(0, 23) + "…" : name }));
    svg.append(s("rect", { x: labelW, y: y + 4, width: barW, height: row - 10, rx: 4, fill: "#eef0f4" }));
    svg.append(s("rect", { class: "bar", x: labelW, y: y + 4, width: w.toFixed(1), height: row - 10, rx: 4, fill: colorOf(it, i), "fill-opacity": highlight && highlight !== it.label ? 0.55 : 1 }, s("title", { text: `${name}: ${format(it.value)}` })));
    svg.append(s("text", { class: "bar-value", x: labelW + barW + 6, y: y + 16, text: format(it.value) }));
  });
  return svg;
}

// One stacked horizontal bar: the share of each class among `counts` (in class order).
export function shareBar(counts, { width = 260, height = 16 } = {}) {
  const total = counts.reduce((a, b) => a + b, 0) || 1;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "share-bar", role: "img", width, height });
  let x = 0;
  counts.forEach((v, i) => {
    const w = (v / total) * width;
    if (w > 0) svg.append(s("rect", { x: x.toFixed(2), y: 0, width: w.toFixed(2), height, fill: color(i) }, s("title", { text: `${Math.round((100 * v) / total)}%` })));
    x += w;
  });
  return svg;
}

export function classLegend(classes) {
  return legend(classes.map((name, i) => ({ name, color: color(i) })));
}
