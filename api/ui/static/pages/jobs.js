// Jobs: a table filtered by status and batch, paged with the API's cursor, refreshed every 2 s while
// the tab is visible (the page being looked at only: one request per refresh).
import { api } from "../api.js";
import { errorBox, every, fmt, h, statusBadge, table } from "../dom.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];
const REFRESH_MS = 2000;
const LIMIT = 20;

export function render(root, query = "") {
  const params = new URLSearchParams(query);
  const state = { status: params.get("status") || "", batch: params.get("batch_id") || "", cursors: [null] };
  const limit = Math.min(100, Math.max(1, Number(params.get("limit")) || LIMIT));
  const status = h("select", { id: "status-filter", "aria-label": "status" },
    STATUSES.map((s) => h("option", { value: s, selected: s === state.status }, s || "any status")));
  const batch = h("input", { id: "batch-filter", placeholder: "batch id", value: state.batch, size: 30 });
  const prev = h("button", { type: "button", id: "prev-page" }, "‹ Newer");
  const next = h("button", { type: "button", id: "next-page" }, "Older ›");
  const body = h("div");
  const info = h("span", { class: "muted", id: "page-info" });
  root.append(
    h("h1", {}, "Jobs"),
    h("div", { class: "toolbar" }, status, batch, prev, next, info),
    body,
  );
  let nextAfter = null;

  async function load() {
    const q = new URLSearchParams({ limit: String(limit) });
    if (state.status) q.set("status", state.status);
    if (state.batch) q.set("batch_id", state.batch);
    const after = state.cursors[state.cursors.length - 1];
    if (after) q.set("after", after);
    let page;
    try {
      page = await api(`/v1/jobs?${q}`);
    } catch (err) {
      body.replaceChildren(errorBox(err));
      return;
    }
    nextAfter = page.next_after;
    prev.disabled = state.cursors.length === 1;
    next.disabled = !page.has_more;
    info.textContent = `page ${state.cursors.length} · refreshed ${new Date().toLocaleTimeString()}`;
    body.replaceChildren(table(
      ["job", "status", "model", "created", "tokens", "queue", "TTFT", "total", "batch"],
      page.data.map((j) => h("tr", { dataset: { jobId: j.id } },
        h("td", {}, h("a", { href: `#/job/${j.id}`, title: j.id }, fmt.short(j.id))),
        h("td", {}, statusBadge(j.status)),
        h("td", {}, j.model),
        h("td", {}, fmt.time(j.created_at)),
        h("td", { class: "num" }, j.usage ? j.usage.completion_tokens : "–"),
        h("td", { class: "num" }, fmt.ms(j.timings.queue_ms)),
        h("td", { class: "num" }, fmt.ms(j.timings.ttft_ms)),
        h("td", { class: "num" }, fmt.ms(j.timings.total_ms)),
        h("td", {}, j.batch_id ? h("a", { href: `#/jobs/batch_id=${j.batch_id}` }, fmt.short(j.batch_id)) : "–"),
      )),
      { id: "jobs-table" },
    ));
  }

  const restart = () => { state.cursors = [null]; load(); };
  status.addEventListener("change", () => { state.status = status.value; restart(); });
  batch.addEventListener("change", () => { state.batch = batch.value.trim(); restart(); });
  next.addEventListener("click", () => { if (nextAfter) { state.cursors.push(nextAfter); load(); } });
  prev.addEventListener("click", () => { if (state.cursors.length > 1) { state.cursors.pop(); load(); } });
  return every(REFRESH_MS, load);
}
