// Overview: queue depth per model and lane, running jobs, free slots, workers, recent failures, and
// charts of the last minutes sampled here from GET /v1/stats and the recent jobs' timings.
import { api } from "../api.js";
import { lineChart } from "../chart.js";
import { card, every, fmt, h, statusBadge, table } from "../dom.js";

const SAMPLE_MS = 2000;
const SPAN_S = 300;
// Kept across page changes, so that the charts are not empty on coming back.
const history = { waiting: [], rate: [], ttft: [] };

function record(series, t, v) {
  series.push({ t, v });
  while (series.length && series[0].t < t - SPAN_S) series.shift();
}

function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function wide(title, ...children) {
  return h("section", { class: "card span" }, h("h2", {}, title), ...children);
}

function jobLink(job) {
  return h("a", { href: `#/job/${job.id}` }, fmt.short(job.id));
}

export function render(root) {
  const body = h("div", { class: "grid wide" });
  root.append(h("h1", {}, "Overview"), body);
  return every(SAMPLE_MS, async () => {
    const [stats, workers, running, failed, done] = await Promise.all([
      api("/v1/stats"),
      api("/v1/workers"),
      api("/v1/jobs?status=running&limit=10"),
      api("/v1/jobs?status=failed&limit=5"),
      api("/v1/jobs?status=succeeded&limit=10"),
    ]);
    const t = stats.time;
    const sum = (f) => stats.models.reduce((acc, m) => acc + f(m), 0);
    record(history.waiting, t, sum((m) => m.waiting.interactive + m.waiting.batch));
    record(history.rate, t, sum((m) => m.tokens_per_s));
    const ttft = median(done.data.map((j) => j.timings.ttft_ms).filter((v) => v !== null));
    record(history.ttft, t, ttft === null ? null : ttft / 1000);
    body.replaceChildren(
      wide("Queues",
        table(["model", "waiting (interactive)", "waiting (batch)", "running", "workers", "free slots", "tokens/s"],
          stats.models.map((m) => h("tr", { dataset: { model: m.model } },
            h("td", {}, m.model), h("td", { class: "num" }, m.waiting.interactive),
            h("td", { class: "num" }, m.waiting.batch), h("td", { class: "num" }, m.running),
            h("td", { class: "num" }, m.workers), h("td", { class: "num" }, `${m.free_slots} / ${m.capacity}`),
            h("td", { class: "num" }, fmt.num(m.tokens_per_s))))),
      ),
      wide("Last minutes",
        h("div", { class: "charts" },
          lineChart("Jobs waiting", history.waiting, { span: SPAN_S }),
          lineChart("Tokens/s", history.rate, { span: SPAN_S }),
          lineChart("TTFT (median of the last 10 jobs)", history.ttft, { span: SPAN_S, unit: " s" })),
      ),
      wide("Workers",
        // A tenant key's view lists its own jobs only and no hosts; an admin key sees the whole fleet.
        h("p", { id: "fleet-view", class: "note", dataset: { view: workers.view } },
          workers.view === "full" ? "Full view: every worker's jobs, hosts and pids."
            : "Tenant view: your own running jobs only; other tenants' jobs are counted in \"running\". An admin key sees hosts and every job."),
        table(["id", ...(workers.view === "full" ? ["host"] : []), "device", "model", "running", "tokens/s", "state"],
          workers.data.map((w) => h("tr", {},
            h("td", { title: w.id }, fmt.short(w.id)), ...(workers.view === "full" ? [h("td", {}, w.host)] : []), h("td", {}, w.device),
            h("td", {}, w.model), h("td", { class: "num" }, `${w.running} / ${w.capacity}`),
            h("td", { class: "num" }, fmt.num(w.tokens_per_s)),
            h("td", {}, w.draining ? h("span", { class: "badge status-cancelled" }, "draining") : "serving")))),
      ),
      card("Running jobs",
        table(["job", "model", "started", "tokens"],
          running.data.map((j) => h("tr", {}, h("td", {}, jobLink(j)), h("td", {}, j.model),
            h("td", {}, fmt.time(j.started_at)), h("td", { class: "num" }, j.usage ? j.usage.completion_tokens : "–")))),
      ),
      card("Recent failures",
        table(["job", "finished", "error"],
          failed.data.map((j) => h("tr", {}, h("td", {}, jobLink(j)), h("td", {}, fmt.time(j.finished_at)),
            h("td", {}, j.error ? `${j.error.type}: ${j.error.message}` : statusBadge(j.status))))),
      ),
    );
  });
}

