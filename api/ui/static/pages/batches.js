// Batches: status and a progress bar from request_counts, the output and error files, cancel.
import { api, download } from "../api.js";
import { errorBox, every, fmt, h, table } from "../dom.js";

const REFRESH_MS = 2000;
const CANCELLABLE = new Set(["validating", "in_progress"]);

function progress(counts) {
  const total = counts.total || 0;
  const done = (counts.completed || 0) + (counts.failed || 0);
  const pct = total ? Math.round((100 * done) / total) : 0;
  const bar = h("div", { class: "bar" });
  bar.style.width = `${pct}%`; // CSSOM, not an inline style attribute: the page's CSP allows it
  return h("div", {
    class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct,
    title: `${done} of ${total}`,
  }, bar, h("span", { class: "label" }, `${pct} % · ${counts.completed} ok, ${counts.failed} failed of ${total}`));
}

function fileLink(id, name, problem) {
  if (!id) return "–";
  return h("a", {
    href: "#", class: "file", dataset: { fileId: id },
    onclick: (event) => {
      event.preventDefault();
      download(id, name).catch((err) => problem.replaceChildren(errorBox(err)));
    },
  }, name);
}

export function render(root) {
  const body = h("div");
  const problem = h("div");
  root.append(h("h1", {}, "Batches"), problem, body);

  async function cancel(batch) {
    try {
      await api(`/v1/batches/${encodeURIComponent(batch.id)}/cancel`, { method: "POST" });
      await load();
    } catch (err) {
      problem.replaceChildren(errorBox(err));
    }
  }

  async function load() {
    const page = await api("/v1/batches?limit=50");
    body.replaceChildren(table(
      ["batch", "status", "progress", "created", "endpoint", "output", "errors", ""],
      page.data.map((b) => h("tr", { dataset: { batchId: b.id, status: b.status } },
        h("td", {}, h("a", { href: `#/jobs/batch_id=${b.id}`, title: "its jobs" }, fmt.short(b.id))),
        h("td", {}, h("span", { class: `badge status-${b.status}` }, b.status)),
        h("td", {}, progress(b.request_counts)),
        h("td", {}, fmt.time(b.created_at)),
        h("td", {}, b.endpoint),
        h("td", {}, fileLink(b.output_file_id, `${b.id}-output.jsonl`, problem)),
        h("td", {}, fileLink(b.error_file_id, `${b.id}-errors.jsonl`, problem)),
        h("td", {}, CANCELLABLE.has(b.status)
          ? h("button", { type: "button", class: "danger", onclick: () => cancel(b) }, "Cancel") : ""),
      )),
      { id: "batches-table" },
    ));
  }
  return every(REFRESH_MS, load);
}
