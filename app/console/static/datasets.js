// Datasets: list and create; one dataset: upload (drag and drop or file picker) with the per-file
// report, and its images as thumbnails.

import { api, ApiError } from "./api.js";
import { badge, bytes, clear, errorBox, h, when, refill } from "./dom.js";

const THUMB_PAGE = 48;

export async function list(page) {
  const datasets = await api("/v1/datasets?limit=100");
  const message = h("div");
  const name = h("input", { name: "name", id: "new-dataset-name", placeholder: "e.g. shop photos", required: true, maxlength: 200 });
  const form = h(
    "form",
    {
      class: "inline",
      id: "create-dataset",
      onsubmit: async (event) => {
        event.preventDefault();
        clear(message);
        try {
          const ds = await api("/v1/datasets", { method: "POST", json: { name: name.value.trim() } });
          location.hash = `#/datasets/${ds.id}`;
        } catch (err) {
          message.append(errorBox(err));
        }
      },
    },
    h("label", {}, "New dataset", name),
    h("button", { class: "primary", type: "submit", text: "Create" }),
  );
  const rows = datasets.data.map((ds) =>
    h(
      "tr",
      { "data-id": ds.id },
      h("td", {}, h("a", { href: `#/datasets/${ds.id}`, text: ds.name })),
      h("td", {}, badge(ds.status)),
      h("td", { class: "num", text: ds.image_count }),
      h("td", { class: "num", text: ds.eval_image_count }),
      h("td", { class: "num", text: bytes(ds.total_bytes) }),
      h("td", { text: when(ds.created_at) }),
    ),
  );
  return h(
    "section",
    {},
    h("div", { class: "head" }, h("h2", { text: "Datasets" })),
    h("div", { class: "card" }, form, message),
    h(
      "div",
      { class: "card" },
      rows.length
        ? h(
            "table",
            { id: "datasets-table" },
            h("thead", {}, h("tr", {}, ["Name", "Status"].map((t) => h("th", { text: t })), ["Training images", "Eval images", "Size"].map((t) => h("th", { class: "num", text: t })), h("th", { text: "Created" }))),
            h("tbody", {}, rows),
          )
        : h("div", { class: "empty", text: "No datasets yet: create one above, then drop your images on it." }),
      datasets.has_more ? h("p", { class: "hint", text: "Showing the newest 100." }) : null,
    ),
  );
}

export async function detail(page, id) {
  const ds = await api(`/v1/datasets/${encodeURIComponent(id)}`);
  const facts = h("dl", { class: "facts" });
  const showFacts = (d) => {
    refill(facts, 
      h("dt", { text: "Id" }), h("dd", { class: "mono", text: d.id }),
      h("dt", { text: "Status" }), h("dd", {}, badge(d.status)),
      h("dt", { text: "Training images" }), h("dd", { id: "image-count", text: d.image_count }),
      h("dt", { text: "Evaluation images" }), h("dd", { text: d.eval_image_count }),
      h("dt", { text: "Size" }), h("dd", { text: bytes(d.total_bytes) }),
      h("dt", { text: "Created" }), h("dd", { text: when(d.created_at) }),
    );
  };
  showFacts(ds);

  const grid = h("div", { class: "thumbs", id: "thumbs" });
  const more = h("button", { type: "button", text: "Load more", hidden: true });
  let cursor = null;
  const loadThumbs = async (reset) => {
    if (reset) {
      clear(grid);
      cursor = null;
    }
    const qs = `limit=${THUMB_PAGE}${cursor ? `&after=${encodeURIComponent(cursor)}` : ""}`;
    const images = await api(`/v1/datasets/${encodeURIComponent(ds.id)}/images?${qs}`);
    if (!page.active) return;
    if (!images.data.length && !grid.children.length) grid.append(h("div", { class: "empty", text: "No images yet." }));
    for (const img of images.data) grid.append(thumbnail(page, ds.id, img));
    cursor = images.next_cursor;
    more.hidden = !images.has_more;
  };
  more.addEventListener("click", () => loadThumbs(false));

  const report = h("div", { id: "upload-report" });
  const uploader = dropzone(page, ds, async (outcome) => {
    refill(report, outcome);
    const fresh = await api(`/v1/datasets/${encodeURIComponent(ds.id)}`);
    if (!page.active) return;
    showFacts(fresh);
    await loadThumbs(true);
  });

  const del = h("button", {
    type: "button",
    class: "danger",
    text: "Delete dataset",
    onclick: async () => {
      if (!window.confirm(`Delete dataset "${ds.name}" and its images?`)) return;
      try {
        await api(`/v1/datasets/${encodeURIComponent(ds.id)}`, { method: "DELETE" });
        location.hash = "#/datasets";
      } catch (err) {
        report.prepend(errorBox(err));
      }
    },
  });

  const content = h(
    "section",
    {},
    h(
      "div",
      { class: "head" },
      h("h2", { text: ds.name }),
      h("span", { class: "spacer" }),
      h("a", { class: "button primary", href: `#/jobs/new?dataset=${encodeURIComponent(ds.id)}`, text: "New job on this dataset" }),
      del,
    ),
    h("div", { class: "row" }, h("div", { class: "card" }, facts), h("div", { class: "card grow" }, h("h3", { text: "Add images" }), uploader, report)),
    h("div", { class: "card" }, h("h3", { text: "Images" }), grid, h("p", {}, more)),
  );
  await loadThumbs(true);
  return content;
}

function thumbnail(page, datasetId, img) {
  const pic = h("div", { class: "pic" });
  const caption = h(
    "figcaption",
    { title: `${img.filename} · ${img.width}×${img.height} · ${bytes(img.bytes)}` },
    img.label ? h("b", { text: `${img.label} · ` }) : null,
    img.filename,
  );
  const fig = h("figure", { class: "thumb", "data-image": img.id, "data-split": img.split }, pic, caption);
  // An <img src> cannot carry the key: the thumbnail is fetched with it and shown from a blob URL.
  api(`/v1/datasets/${encodeURIComponent(datasetId)}/images/${encodeURIComponent(img.id)}/thumbnail?size=240`, { raw: true, cache: "default" })
    .then((r) => r.blob())
    .then((blob) => {
      if (!page.active) return;
      const el = h("img", { alt: img.filename, src: page.objectUrl(blob) });
      pic.append(el);
    })
    .catch(() => pic.append(h("span", { class: "hint", text: "no preview" })));
  return fig;
}

// The drop area and file picker; `done(reportElement)` after each upload.
function dropzone(page, ds, done) {
  const input = h("input", { type: "file", id: "upload-input", multiple: true, accept: "image/*,.zip,.tar,.tgz,.gz,.bz2,.xz" });
  const split = h(
    "select",
    { id: "upload-split" },
    h("option", { value: "train", text: "training images (unlabelled)" }),
    h("option", { value: "eval", text: "evaluation split (labelled: archive with class folders)" }),
  );
  const status = h("span", { class: "hint" });
  const zone = h(
    "div",
    { class: "dropzone", id: "dropzone" },
    h("div", {}, h("strong", { text: "Drop images or .zip / .tar.gz archives here" })),
    h("div", { class: "hint", text: "Evaluation images need a class: an archive laid out class_name/file.jpg. They are never trained on." }),
    h("div", { class: "choose" }, h("label", { class: "button" }, "Choose files", input), split, status),
  );
  input.hidden = true;
  const send = async (files) => {
    if (!files.length) return;
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    form.append("split", split.value);
    status.textContent = `uploading ${files.length} file${files.length > 1 ? "s" : ""}…`;
    zone.classList.add("busy");
    try {
      const result = await api(`/v1/datasets/${encodeURIComponent(ds.id)}/images`, { method: "POST", form });
      await done(uploadReport(result.accepted, result.duplicates, result.rejected));
    } catch (err) {
      // Nothing accepted: the problem lists every file's reason.
      const rejected = err instanceof ApiError && err.problem && Array.isArray(err.problem.rejected) ? err.problem.rejected : null;
      await done(h("div", {}, errorBox(err), rejected ? uploadReport([], [], rejected) : null));
    } finally {
      status.textContent = "";
      zone.classList.remove("busy");
      input.value = "";
    }
  };
  input.addEventListener("change", () => send([...input.files]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    send([...((event.dataTransfer && event.dataTransfer.files) || [])]);
  });
  return zone;
}

function uploadReport(accepted, duplicates, rejected) {
  const summary = h(
    "div",
    { class: "report-summary" },
    h("span", { class: "badge succeeded", id: "accepted-count", text: `${accepted.length} accepted` }),
    h("span", { class: "badge", text: `${duplicates.length} duplicate${duplicates.length === 1 ? "" : "s"}` }),
    h("span", { class: `badge ${rejected.length ? "failed" : ""}`, id: "rejected-count", text: `${rejected.length} rejected` }),
  );
  const lists = [];
  if (rejected.length) {
    lists.push(
      h("h3", { text: "Rejected" }),
      h("table", { class: "report", id: "rejected-files" }, h("tbody", {}, rejected.map((r) =>
        h("tr", {}, h("td", { class: "mono", text: r.filename }), h("td", { class: "code", text: r.code }), h("td", { text: r.message }))))),
    );
  }
  if (accepted.length) {
    const items = accepted.map((a) => h("li", {}, h("span", { class: "mono", text: a.filename }), h("span", { class: "muted", text: ` ${a.width}×${a.height}${a.label ? ` · ${a.label}` : ""}` })));
    lists.push(h("details", { id: "accepted-files" }, h("summary", { text: `Accepted files (${accepted.length})` }), h("ul", { class: "report" }, items)));
  }
  if (duplicates.length) {
    lists.push(h("details", {}, h("summary", { text: `Duplicates, stored once (${duplicates.length})` }), h("ul", { class: "report" }, duplicates.map((d) => h("li", { class: "mono", text: d.filename })))));
  }
  return h("div", {}, summary, lists);
}
