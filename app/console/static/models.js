// Models: list; one model: its evaluation, "try it" (the adapted model beside zero-shot CLIP on
// a dropped image) and copy-paste snippets.

import { api, getKey } from "./api.js";
import { badge, bytes, clear, errorBox, h, when, refill } from "./dom.js";
import { evaluationView, KIND_COLORS, KIND_NAMES } from "./evaluation.js";
import { bars } from "./plots.js";

export async function list() {
  const models = await api("/v1/models?limit=100");
  const rows = models.data.map((m) =>
    h(
      "tr",
      { "data-id": m.id },
      h("td", {}, h("a", { class: "mono", href: `#/models/${m.id}`, text: m.id })),
      h("td", {}, badge(m.kind)),
      h("td", { text: m.class_names.join(", ") }),
      h("td", { class: "mono", text: m.base_model }),
      h("td", { class: "num", text: bytes(m.size_bytes) }),
      h("td", { text: when(m.created_at) }),
    ),
  );
  return h(
    "section",
    {},
    h("div", { class: "head" }, h("h2", { text: "Models" })),
    h(
      "div",
      { class: "card" },
      rows.length
        ? h("table", { id: "models-table" }, h("thead", {}, h("tr", {}, ["Model", "Serves", "Classes", "Base model", "Delta"].map((t) => h("th", { text: t })).concat([h("th", { text: "Created" })]))), h("tbody", {}, rows))
        : h("div", { class: "empty" }, "No models yet: a job that succeeds makes one. ", h("a", { href: "#/jobs/new", text: "Submit a job" })),
    ),
  );
}

export async function detail(page, id) {
  const model = await api(`/v1/models/${encodeURIComponent(id)}`);
  const facts = h(
    "dl",
    { class: "facts" },
    h("dt", { text: "Serves" }), h("dd", {}, badge(model.kind), " ", KIND_NAMES[model.kind] || ""),
    h("dt", { text: "Classes" }), h("dd", { text: model.class_names.join(", ") }),
    h("dt", { text: "Base model" }), h("dd", { class: "mono", text: model.base_model }),
    h("dt", { text: "Job" }), h("dd", {}, model.job_id ? h("a", { class: "mono", href: `#/jobs/${model.job_id}`, text: model.job_id }) : "—"),
    h("dt", { text: "Tuned tensors" }), h("dd", { text: `${model.num_parameters.toLocaleString()} parameters, ${bytes(model.size_bytes)}` }),
    h("dt", { text: "Created" }), h("dd", { text: when(model.created_at) }),
  );
  return h(
    "section",
    {},
    h("div", { class: "head" }, h("h2", { class: "mono", text: model.id })),
    h("div", { class: "card" }, facts),
    tryIt(page, model),
    evaluationView(model, null),
    snippets(model),
  );
}

function tryIt(page, model) {
  const preview = h("div", { class: "preview" }, h("span", { class: "hint", text: "no image yet" }));
  const adapted = h("div", { id: "adapted-result" });
  const zeroShot = h("div", { id: "zero-shot-result" });
  const n = model.class_names.length;
  const ks = [...new Set([1, 3, 5, 10, n])].filter((k) => k <= n).sort((a, b) => a - b);
  const topK = h("select", { id: "try-top-k" }, ks.map((k) => h("option", { value: k, selected: k === Math.min(5, n), text: k === n ? `all ${n} classes` : `top ${k}` })));
  const input = h("input", { type: "file", id: "try-input", accept: "image/*" });
  input.hidden = true;
  const zone = h(
    "div",
    { class: "dropzone", id: "try-dropzone" },
    h("div", {}, h("strong", { text: "Drop an image here" })),
    h("div", { class: "choose" }, h("label", { class: "button" }, "Choose an image", input), topK),
  );
  let last = null;
  const classify = async (file) => {
    if (!file) return;
    last = file;
    const img = h("img", { alt: file.name, src: page.objectUrl(file) });
    refill(preview, img);
    const topk = topK.value;
    const column = (el, title, run, fill) => {
      refill(el, h("h3", { text: title }), h("div", { class: "loading", text: "classifying…" }));
      return run()
        .then((result) => {
          const preds = result.data[0].predictions;
          refill(el, h("h3", { text: title }), bars(preds.map((p) => ({ label: p.label, value: p.score })), { width: 360, colorOf: () => fill }));
        })
        .catch((err) => refill(el, h("h3", { text: title }), errorBox(err)));
    };
    const form = (extra) => {
      const f = new FormData();
      f.append("files", file, file.name);
      f.append("top_k", topk);
      for (const [k, v] of Object.entries(extra)) f.append(k, v);
      return f;
    };
    await Promise.all([
      column(adapted, `This model (${KIND_NAMES[model.kind] || model.kind})`, () =>
        api(`/v1/models/${encodeURIComponent(model.id)}/classify`, { method: "POST", form: form({}) }), KIND_COLORS[model.kind]),
      column(zeroShot, "Zero-shot CLIP (same base, same classes)", () =>
        api("/v1/classify", { method: "POST", form: form({ base_model: model.base_model, class_names: JSON.stringify(model.class_names) }) }), KIND_COLORS.zero_shot),
    ]);
  };
  input.addEventListener("change", () => classify(input.files[0]));
  topK.addEventListener("change", () => classify(last));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = (event.dataTransfer && event.dataTransfer.files) || [];
    classify(files[0]);
  });
  return h("div", { class: "card" }, h("h3", { text: "Try it" }), zone, h("div", { class: "try", id: "try-results" }, preview, adapted, zeroShot));
}

function snippets(model) {
  const base = location.origin;
  const keyed = Boolean(getKey());
  const auth = keyed ? ` \\\n  -H "Authorization: Bearer $LAFTER_API_KEY"` : "";
  const curl = `curl -s ${base}/v1/models/${model.id}/classify${auth} \\\n  -F files=@img.jpg -F top_k=3`;
  const python = [
    "from lafter_client import Client",
    "",
    `c = Client("${base}", ${keyed ? 'os.environ["LAFTER_API_KEY"]' : "None"})`,
    `result = c.models.classify("${model.id}", ["img.jpg"], top_k=3)`,
    "print(result)",
  ];
  if (keyed) python.unshift("import os");
  const block = (title, id, text) => {
    const pre = h("pre", { class: "snippet", id, text });
    const copy = h("button", {
      type: "button",
      text: "Copy",
      onclick: async () => {
        try {
          await navigator.clipboard.writeText(text);
          copy.textContent = "Copied";
        } catch (err) {
          copy.textContent = "Select and copy";
        }
        setTimeout(() => { copy.textContent = "Copy"; }, 1500);
      },
    });
    return [h("div", { class: "snippet-head" }, h("h3", { text: title }), copy), pre];
  };
  return h(
    "div",
    { class: "card", id: "snippets" },
    block("curl", "snippet-curl", curl),
    block("Python (lafter_client)", "snippet-python", python.join("\n")),
    keyed ? h("p", { class: "hint", text: "Set LAFTER_API_KEY to your key first; this page never prints it." }) : null,
  );
}
