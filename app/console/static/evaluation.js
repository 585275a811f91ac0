// A finished job's evaluation, from its model: which classifier is served and why, accuracies on a
// labelled evaluation split when there is one, and the label-free diagnostics of all three.

import { badge, h, pct } from "./dom.js";
import { bars, classLegend, shareBar } from "./plots.js";

export const KIND_NAMES = {
  zero_shot: "zero-shot CLIP",
  text_classifier: "text classifier (stage 1)",
  lafter: "adapted (LaFTer)",
};
const KINDS = ["zero_shot", "text_classifier", "lafter"];
export const KIND_COLORS = { zero_shot: "#8a94a8", text_classifier: "#e0a800", lafter: "#1a9c5b" };

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
      h("div", { class: "chart", id: "chart-accuracy" },
        h("h3", { text: `Accuracy on ${labelled.images} labelled evaluation images` }),
        bars(items, { colorOf: (it) => KIND_COLORS[it.kind], highlight: KIND_NAMES[selection.served] })),
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
