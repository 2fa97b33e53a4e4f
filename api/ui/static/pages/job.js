// One job: its request, timings, usage, attempts, error and output, the live token stream (resumed
// after a reconnect from the last event id), and a cancel button while it can still be cancelled.
import { api, followJob } from "../api.js";
import { card, errorBox, fmt, h, statusBadge } from "../dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "expired"]);

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

export function render(root, jobId) {
  const controller = new AbortController();
  const title = h("h1", {}, "Job ", h("code", {}, jobId));
  const statusSlot = h("span", { id: "job-status" });
  const cancel = h("button", { type: "button", id: "cancel-job", class: "danger", hidden: true }, "Cancel");
  const streamState = h("span", { id: "stream-state", class: "muted" }, "");
  const output = h("pre", { id: "job-output", class: "output" });
  const details = h("div", { class: "grid" });
  const problem = h("div");
  root.append(title, h("div", { class: "toolbar" }, statusSlot, cancel, streamState), problem,
    card("Output", output), details);

  let tokens = 0;
  async function refresh() {
    const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal: controller.signal });
    statusSlot.replaceChildren(statusBadge(job.status));
    cancel.hidden = TERMINAL.has(job.status);
    const t = job.timings;
    details.replaceChildren(...[
      card("Timings", facts([
        ["created", fmt.time(job.created_at)], ["started", fmt.time(job.started_at)],
        ["finished", fmt.time(job.finished_at)], ["queue", fmt.ms(t.queue_ms)], ["TTFT", fmt.ms(t.ttft_ms)],
        ["total", fmt.ms(t.total_ms)], ["tokens/s", fmt.num(t.tokens_per_s)],
      ])),
      card("Run", facts([
        ["model", job.model], ["attempts", job.attempts], ["worker", job.worker_id || "–"],
        ["finish reason", job.finish_reason || "–"], ["peak batch", job.peak_batch_size ?? "–"],
        ["usage", job.usage ? `${job.usage.prompt_tokens} prompt + ${job.usage.completion_tokens} generated` : "–"],
        ["batch", job.batch_id ? `${job.batch_id} (${job.custom_id})` : "–"],
        ["waiting", job.waiting || (job.queue_position ? `position ${job.queue_position}` : "–")],
      ])),
      job.error ? card("Error", h("p", { class: "error", id: "job-error" }, `${job.error.type}: ${job.error.message}`)) : null,
      card("Request", h("pre", { class: "json" }, JSON.stringify(job.request, null, 2))),
    ].filter(Boolean));
    return job;
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
      await refresh();
    } catch (err) {
      problem.replaceChildren(errorBox(err));
    } finally {
      cancel.disabled = false;
    }
  });

  (async () => {
    try {
      const job = await refresh();
      if (job.data_removed) {
        streamState.textContent = "data removed";
        return;
      }
      streamState.textContent = "streaming";
      await followJob(jobId, {
        signal: controller.signal,
        onReconnect: (n, last) => { streamState.textContent = `reconnecting (${n}) after event ${last}`; },
        onEvent: (ev) => {
          streamState.textContent = `streaming · event ${ev.id}`;
          if (ev.event === "token") {
            tokens += 1;
            output.append(document.createTextNode(ev.data.text));
          } else if (ev.event === "status") {
            statusSlot.replaceChildren(statusBadge(ev.data.status));
          } else if (ev.event === "error") {
            problem.replaceChildren(errorBox(new Error(`${ev.data.type}: ${ev.data.message}`)));
          }
        },
      });
      if (controller.signal.aborted) return;
      streamState.textContent = `stream ended · ${tokens} token events`;
      streamState.dataset.ended = "true";
      await refresh();
    } catch (err) {
      if (!controller.signal.aborted) problem.replaceChildren(errorBox(err));
    }
  })();
  return () => controller.abort();
}

