// Jobs: list, submit, and one job live (stage, progress, plots from its events, the evaluation).

import { api, listAll } from "./api.js";
import { badge, clear, duration, errorBox, h, progressBar, when, refill } from "./dom.js";
import { evaluationView } from "./evaluation.js";
import { lineChart, stackedShares } from "./plots.js";

const STAGES = ["describing", "encoding_text", "training_text_classifier", "adapting", "evaluating", "registering"];
const ACTIVE = new Set(["queued", "running", "cancelling"]);
const POLL_MS = 1000;

export async function list(page) {
  const table = h("tbody");
  const render = (jobs) => {
    clear(table);
    if (!jobs.length) table.append(h("tr", {}, h("td", { colspan: 6, class: "empty", text: "No jobs yet." })));
    for (const job of jobs) {
      table.append(
        h(
          "tr",
          { "data-id": job.id },
          h("td", {}, h("a", { class: "mono", href: `#/jobs/${job.id}`, text: job.id })),
          h("td", {}, badge(job.status)),
          h("td", { text: ACTIVE.has(job.status) && job.stage ? job.stage.replace(/_/g, " ") : "" }),
          h("td", {}, progressBar(job.progress.percent, job.status)),
          h("td", { text: job.class_names.join(", ") }),
          h("td", { text: when(job.created_at) }),
        ),
      );
    }
  };
  const first = await api("/v1/jobs?limit=50");
  render(first.data);
  // Follow the jobs still running.
  page.every(2000, async () => {
    const jobs = (await api("/v1/jobs?limit=50")).data;
    if (page.active) render(jobs);
    return jobs.some((j) => ACTIVE.has(j.status));
  });
  return h(
    "section",
    {},
    h("div", { class: "head" }, h("h2", { text: "Jobs" }), h("span", { class: "spacer" }), h("a", { class: "button primary", href: "#/jobs/new", id: "new-job", text: "New job" })),
    h(
      "div",
      { class: "card" },
      h("table", { id: "jobs-table" }, h("thead", {}, h("tr", {}, ["Job", "Status", "Stage", "Progress", "Classes", "Created"].map((t) => h("th", { text: t })))), table),
    ),
  );
}

function splitNames(text) {
  const sep = text.includes("\n") ? /\n/ : /,/;
  return text.split(sep).map((x) => x.trim()).filter(Boolean);
}

export async function create(page) {
  const [datasets, baseModels] = await Promise.all([
    listAll("/v1/datasets", 300),
    api("/v1/base-models").catch(() => ({ data: [] })),
  ]);
  const chosen = page.query.get("dataset");
  const dataset = h(
    "select",
    { name: "dataset_id", id: "job-dataset", required: true },
    datasets.map((d) => h("option", { value: d.id, selected: d.id === chosen, text: `${d.name} (${d.image_count} images${d.eval_image_count ? `, ${d.eval_image_count} eval` : ""})` })),
  );
  const classes = h("textarea", { name: "class_names", id: "job-classes", rows: 4, required: true, placeholder: "cat\ndog\nhorse" });
  const models = h("datalist", { id: "base-model-list" }, baseModels.data.map((m) => h("option", { value: m.spec })));
  const baseModel = h("input", { name: "base_model", id: "job-base-model", list: "base-model-list", value: "ViT-B-32::openai", required: true });
  const source = h(
    "select",
    { name: "descriptions", id: "job-descriptions" },
    [["auto", "auto: the language model if one is configured, else templates"], ["llm", "llm: the configured language model"], ["templates", "templates: no language model"]].map(([v, t]) => h("option", { value: v, text: t })),
  );
  const domain = h("input", { name: "domain", id: "job-domain", placeholder: "optional, e.g. sketch, satellite photo" });
  const recipe = h(
    "select",
    { name: "recipe", id: "job-recipe" },
    h("option", { value: "default", text: "default: scaled to the model, debiased pseudo-labels" }),
    h("option", { value: "paper", text: "paper: the published recipe" }),
  );
  const seed = h("input", { name: "seed", id: "job-seed", type: "number", min: 0, max: 2147483647, placeholder: "random" });
  const hp = h("textarea", { name: "hyperparameters", id: "job-hyperparameters", rows: 3, class: "mono", placeholder: '{"epochs": "auto", "batch_size": "auto"}' });
  const message = h("div");
  const submit = h("button", { class: "primary", type: "submit", id: "submit-job", text: "Submit job" });
  const form = h(
    "form",
    {
      class: "grid",
      id: "job-form",
      onsubmit: async (event) => {
        event.preventDefault();
        clear(message);
        const body = {
          dataset_id: dataset.value,
          class_names: splitNames(classes.value),
          base_model: baseModel.value.trim(),
          descriptions: { source: source.value },
          recipe: recipe.value,
        };
        if (domain.value.trim()) body.descriptions.domain = domain.value.trim();
        if (seed.value !== "") body.seed = Number(seed.value);
        if (hp.value.trim()) {
          try {
            body.hyperparameters = JSON.parse(hp.value);
          } catch (err) {
            message.append(errorBox(new Error(`hyperparameters is not valid JSON: ${err.message}`)));
            return;
          }
        }
        submit.disabled = true;
        try {
          const job = await api("/v1/jobs", { method: "POST", json: body });
          location.hash = `#/jobs/${job.id}`;
        } catch (err) {
          message.append(errorBox(err));
        } finally {
          submit.disabled = false;
        }
      },
    },
    h("label", {}, "Dataset", dataset),
    h("label", {}, "Base model", baseModel, models),
    h("label", { class: "wide" }, "Class names (one per line, or comma-separated)", classes),
    h("label", {}, "Descriptions", source),
    h("label", {}, "Domain", domain),
    h("label", {}, "Recipe", recipe),
    h("label", {}, "Seed", seed),
    h("label", { class: "wide" }, "Hyperparameters (JSON, optional: every value 'auto' by default)", hp),
    h("div", { class: "wide" }, submit, message),
  );
  return h(
    "section",
    {},
    h("div", { class: "head" }, h("h2", { text: "New job" })),
    datasets.length
      ? h("div", { class: "card" }, form)
      : h("div", { class: "card empty" }, "Create a dataset and upload images first. ", h("a", { href: "#/datasets", text: "Datasets" })),
  );
}

// The plots' data, accumulated from the job's events as they arrive.
class Series {
  constructor() {
    this.text = [];
    this.adapt = [];
    this.histSteps = [];
    this.hist = [];
    this.log = [];
  }

  add(event) {
    const d = event.data || {};
    if (event.kind === "metric" && typeof d.loss === "number") {
      if (event.stage === "training_text_classifier") this.text.push([event.step, d.loss]);
      if (event.stage === "adapting") this.adapt.push([event.step, d.loss]);
    }
    if (event.kind === "metric" && event.stage === "adapting" && Array.isArray(d.pseudo_label_histogram)) {
      this.histSteps.push(event.step);
      this.hist.push(d.pseudo_label_histogram);
    }
    if (event.kind === "log") this.log.push(event);
  }
}

export async function detail(page, id) {
  let job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
  const series = new Series();
  let cursor = "0";

  const header = h("div", { class: "head" });
  const progress = h("div", { id: "job-progress" });
  const facts = h("dl", { class: "facts" });
  const errorSlot = h("div");
  const textChart = h("div", { class: "card chart", id: "chart-text-loss" });
  const adaptChart = h("div", { class: "card chart", id: "chart-adapt-loss" });
  const histChart = h("div", { class: "card chart", id: "chart-pseudo-labels" });
  const evaluation = h("div", { id: "job-evaluation" });
  const warnings = h("div", { id: "job-warnings" });
  const logBox = h("div", { class: "log", id: "job-log" });
  const hpBox = h("pre", { class: "mono" });
  let evaluationShown = false;
  let drawn = "";

  const renderHeader = () => {
    const cancel = ACTIVE.has(job.status) && job.status !== "cancelling"
      ? h("button", {
          type: "button",
          class: "danger",
          id: "cancel-job",
          text: "Cancel",
          onclick: async () => {
            try {
              job = await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
              renderHeader();
            } catch (err) {
              errorSlot.append(errorBox(err));
            }
          },
        })
      : null;
    refill(header, 
      h("h2", { class: "mono", text: job.id }),
      h("span", { id: "job-status" }, badge(job.status)),
      h("span", { class: "spacer" }),
      job.model_id ? h("a", { class: "button primary", id: "open-model", href: `#/models/${job.model_id}`, text: "Open the model" }) : null,
      cancel,
    );
    const p = job.progress;
    const eta = ACTIVE.has(job.status) && p.eta_seconds !== null ? ` · about ${duration(p.eta_seconds)} left` : "";
    const step = p.total_steps ? ` · step ${p.step} of ${p.total_steps}` : "";
    const where = job.status === "queued"
      ? `queued${job.queue_position ? ` (position ${job.queue_position})` : ""}`
      : ACTIVE.has(job.status) && job.stage ? job.stage.replace(/_/g, " ") : job.status;
    const doneIndex = job.status === "succeeded" ? STAGES.length : STAGES.indexOf(job.stage);
    refill(progress, 
      h("ul", { class: "stages" }, STAGES.map((st, i) => h("li", { class: i < doneIndex ? "done" : i === doneIndex && ACTIVE.has(job.status) ? "current" : "", text: st.replace(/_/g, " ") }))),
      h("div", { class: "progress-line" }, progressBar(p.percent, job.status, true), h("strong", { id: "job-percent", text: `${Math.round(p.percent)}%` })),
      h("div", { class: "hint", id: "job-stage", text: `${where}${step}${eta}` }),
    );
    refill(facts, 
      h("dt", { text: "Dataset" }), h("dd", {}, job.dataset_id ? h("a", { href: `#/datasets/${job.dataset_id}`, class: "mono", text: job.dataset_id }) : "deleted"),
      h("dt", { text: "Classes" }), h("dd", { text: job.class_names.join(", ") }),
      h("dt", { text: "Base model" }), h("dd", { class: "mono", text: job.base_model }),
      h("dt", { text: "Recipe" }), h("dd", { text: job.recipe }),
      h("dt", { text: "Descriptions" }), h("dd", { text: job.metrics.descriptions ? `${job.metrics.descriptions.source_used} (${job.metrics.descriptions.sentences} sentences)` : job.descriptions.source }),
      h("dt", { text: "Seed" }), h("dd", { text: job.seed }),
      h("dt", { text: "Created" }), h("dd", { text: when(job.created_at) }),
      job.finished_at ? [h("dt", { text: "Finished" }), h("dd", { text: when(job.finished_at) })] : null,
      job.attempts > 1 ? [h("dt", { text: "Attempts" }), h("dd", { text: job.attempts })] : null,
    );
    hpBox.textContent = JSON.stringify(job.hyperparameters, null, 2);
    clear(errorSlot);
    if (job.error) errorSlot.append(h("div", { class: "error-box", id: "job-error" }, h("strong", { text: job.error.code }), ": ", job.error.message));
    clear(warnings);
    for (const w of job.warnings || []) warnings.append(h("div", { class: "warn-box" }, h("strong", { text: w.code }), ": ", w.message || ""));
  };

  const renderCharts = () => {
    const key = `${series.text.length}/${series.adapt.length}/${series.hist.length}`;
    if (key === drawn) return;
    drawn = key;
    refill(textChart, 
      h("h3", { text: "Stage 1: text classifier loss" }),
      h("div", { class: "sub", text: "trained on the class descriptions' embeddings" }),
      lineChart([{ name: "loss", points: series.text }], { yTitle: "loss" }),
    );
    refill(adaptChart, 
      h("h3", { text: "Stage 2: adaptation loss" }),
      h("div", { class: "sub", text: "student on strong views vs. the teacher's pseudo-labels (mean over each logging window)" }),
      lineChart([{ name: "loss", points: series.adapt, color: "#e8590c" }], { yTitle: "loss" }),
    );
    refill(histChart, 
      h("h3", { text: "Pseudo-labels over time" }),
      h("div", { class: "sub", text: "share of each class among the teacher's pseudo-labels, per logging window" }),
      stackedShares(series.histSteps, series.hist, job.class_names),
    );
  };

  const renderLog = () => {
    clear(logBox);
    for (const e of series.log.slice(-200)) {
      logBox.append(h("div", { class: e.level }, h("span", { class: "t", text: `${new Date(e.created_at).toLocaleTimeString()} ${e.stage || ""} ` }), e.message || ""));
    }
    logBox.scrollTop = logBox.scrollHeight;
  };

  const fetchEvents = async () => {
    for (;;) {
      const pageOfEvents = await api(`/v1/jobs/${encodeURIComponent(job.id)}/events?after=${encodeURIComponent(cursor)}&limit=500`);
      pageOfEvents.data.forEach((e) => series.add(e));
      if (pageOfEvents.next_cursor) cursor = pageOfEvents.next_cursor;
      if (!pageOfEvents.has_more) return pageOfEvents.data.length;
    }
  };

  const showEvaluation = async () => {
    if (evaluationShown || !job.model_id) return;
    evaluationShown = true;
    try {
      const model = await api(`/v1/models/${encodeURIComponent(job.model_id)}`);
      if (page.active) refill(evaluation, evaluationView(model, job));
    } catch (err) {
      evaluation.append(errorBox(err));
    }
  };

  const content = h(
    "section",
    {},
    header,
    h("div", { class: "row" },
      h("div", { class: "card grow" }, progress, errorSlot, warnings),
      h("div", { class: "card side" }, facts, h("details", {}, h("summary", { text: "Hyperparameters" }), hpBox))),
    h("div", { class: "charts" }, textChart, adaptChart, histChart),
    evaluation,
    h("div", { class: "card" }, h("h3", { text: "Events" }), logBox),
  );

  await fetchEvents();
  renderHeader();
  renderCharts();
  renderLog();
  if (!ACTIVE.has(job.status)) await showEvaluation();

  // Live: the job and its new events every second while it runs, then once more after it ends.
  if (ACTIVE.has(job.status)) {
    page.every(POLL_MS, async () => {
      const fresh = await api(`/v1/jobs/${encodeURIComponent(job.id)}`);
      const added = await fetchEvents();
      if (!page.active) return false;
      job = fresh;
      renderHeader();
      renderCharts();
      if (added) renderLog();
      if (ACTIVE.has(job.status)) return true;
      await showEvaluation();
      return false;
    });
  }
  return content;
}
