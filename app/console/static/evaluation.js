// A finished job's evaluation, from its model: which classifier is served and why, accuracies on a
// labelled evaluation split when there is one (with a confusion matrix of each), and the label-free
// diagnostics of all three.

import { badge, h, pct, refill } from "./dom.js";
import { bars, classLegend, shareBar } from "./plots.js";

export const KIND_NAMES = {
  zero_shot: "zero-shot CLIP",
  text_classifier: "text classifier (stage 1)",
  lafter: "adapted (LaFTer)",
};
const KINDS = ["zero_shot", "text_classifier", "lafter"];
export const KIND_COLORS = { zero_shot: "#8a94a8", text_classifier: "#e0a800", lafter: "#1a9c5b" };

// The confusion matrices of the labelled split (rows: true class, columns: predicted class, in the
// job's class order), one classifier at a time: counts, each cell shaded by its share of the row
// (green on the diagonal, red off it), so a class the model confuses stands out whatever its size.
function confusionView(labelled, classes, served) {
  if (!labelled.confusion) {
    if (!labelled.confusion_omitted) return null;
    return h("p", { class: "hint", id: "confusion-omitted", text: `No confusion matrix: ${labelled.confusion_omitted}.` });
  }
  const kinds = KINDS.filter((k) => k in labelled.confusion);
  if (!kinds.length) return null;
  const holder = h("div", { class: "confusion-holder" });
  const buttons = kinds.map((k) => h("button", { type: "button", dataset: { kind: k }, text: KIND_NAMES[k], onclick: () => show(k) }));
  const show = (kind) => {
    for (const b of buttons) b.setAttribute("aria-pressed", String(b.dataset.kind === kind));
    refill(holder, confusionTable(labelled.confusion[kind], classes, kind));
  };
  show(kinds.includes(served) ? served : kinds[kinds.length - 1]);
  return h("div", { class: "chart", id: "chart-confusion" },
    h("h3", { text: "Confusion matrix" }),
    h("div", { class: "sub", text: "rows: true class · columns: predicted class · shade: share of the row" }),
    h("div", { class: "toggle", role: "group", "aria-label": "classifier" }, buttons),
    holder);
}

function confusionTable(matrix, classes, kind) {
  const head = h("tr", {}, h("th", { class: "corner", text: "true ↓  predicted →" }),
    classes.map((c) => h("th", { class: "cls", title: c, text: c })),
    h("th", { class: "num count", text: "images" }));
  const rows = matrix.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0);
    return h("tr", {},
      h("th", { class: "cls", scope: "row", title: classes[i], text: classes[i] }),
      row.map((count, j) => {
        const share = total ? count / total : 0;
        const cell = h("td", { class: i === j ? "cell diag" : "cell", dataset: { row: i, col: j }, title: `${classes[i]} → ${classes[j]}: ${count} of ${total} (${pct(share)})`, text: count });
        if (count > 0) {
          cell.style.background = i === j ? `rgba(26, 127, 75, ${(0.12 + 0.78 * share).toFixed(3)})` : `rgba(180, 35, 24, ${(0.1 + 0.7 * share).toFixed(3)})`;
          if (share > 0.55) cell.classList.add("dark");
        }
        return cell;
      }),
      h("td", { class: "num total", text: total }));
  });
  const right = matrix.reduce((a, row, i) => a + row[i], 0);
  const all = matrix.reduce((a, row) => a + row.reduce((x, y) => x + y, 0), 0);
  return [
    h("table", { id: "confusion", class: "confusion", dataset: { kind } }, h("thead", {}, head), h("tbody", {}, rows)),
    h("p", { class: "hint", id: "confusion-summary", text: `${KIND_NAMES[kind]}: ${right} of ${all} images on the diagonal (${pct(all ? right / all : 0)})` }),
  ];
}

export function evaluationView(model, job) {
  const ev = model.evaluation || {};
  const selection = ev.selection || { served: model.kind, reason: "" };
  const classes = model.class_names;
  const parts = [
    h("h3", { text: "Evaluation" }),
    h("p", { id: "selection" }, "Served: ", badge(selection.served), " ", h("span", { text: selection.reason })),
  ];
  const labelled = ev.labelled;
  if (labelled && labelled.accuracy) {
    const items = KINDS.filter((k) => k in labelled.accuracy).map((k) => ({ label: KIND_NAMES[k], kind: k, value: labelled.accuracy[k] }));
    parts.push(
      h("div", { class: "eval-labelled" },
        h("div", { class: "chart", id: "chart-accuracy" },
          h("h3", { text: `Accuracy on ${labelled.images} labelled evaluation images` }),
          bars(items, { colorOf: (it) => KIND_COLORS[it.kind], highlight: KIND_NAMES[selection.served] })),
        confusionView(labelled, classes, selection.served)),
    );
    if (labelled.guard_would_serve && labelled.guard_would_serve !== selection.served) {
      parts.push(h("p", { class: "hint", text: `Without labels the guard would have served ${KIND_NAMES[labelled.guard_would_serve] || labelled.guard_would_serve}.` }));
    }
  } else {
    parts.push(h("p", { class: "hint", text: "No labelled evaluation split: the label-free guard decided. Upload a small labelled split (an archive of class folders, split \"evaluation\") to decide on accuracy." }));
  }
  const diagnostics = ev.diagnostics || {};
  const consistency = (ev.guard && ev.guard.cluster_consistency) || {};
  const rows = KINDS.filter((k) => k in diagnostics).map((k) => {
    const d = diagnostics[k];
    const hist = d.pseudo_label_histogram || {};
    return h(
      "tr",
      {},
      h("td", {}, KIND_NAMES[k], k === selection.served ? h("span", { class: "muted", text: " (served)" }) : null),
      h("td", { class: "num", text: pct(d.mean_confidence) }),
      h("td", { class: "num", text: d.agreement_with_zero_shot === undefined ? "—" : pct(d.agreement_with_zero_shot) }),
      h("td", { class: "num", text: consistency[k] === undefined ? "—" : consistency[k].toFixed(3) }),
      h("td", {}, shareBar(classes.map((c) => hist[c] || 0))),
    );
  });
  if (rows.length) {
    parts.push(
      h("h3", { text: `On the ${ev.images || ""} training images (no labels needed)` }),
      h("table", { id: "diagnostics" },
        h("thead", {}, h("tr", {}, h("th", { text: "Classifier" }), h("th", { class: "num", text: "Mean confidence" }), h("th", { class: "num", text: "Agrees with zero-shot" }), h("th", { class: "num", text: "Cluster consistency" }), h("th", { text: "Predicted classes" }))),
        h("tbody", {}, rows)),
      classLegend(classes),
    );
  }
  if (ev.collapse && ev.collapse.reasons && ev.collapse.reasons.length) {
    parts.push(h("div", { class: "warn-box", text: `Collapse check: ${ev.collapse.reasons.join("; ")}` }));
  }
  const warnings = (job ? job.warnings : model.warnings) || [];
  if (!job) {
    for (const w of warnings) parts.push(h("div", { class: "warn-box" }, h("strong", { text: w.code }), ": ", w.message || ""));
  }
  return h("div", { class: "card" }, parts);
}
