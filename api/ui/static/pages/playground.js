// Playground: a prompt or a chat, a model and sampling parameters; submits a job (POST /v1/jobs),
// follows its stream, and shows its queue time and TTFT (the worker's, and as seen from this page).
import { api, followJob } from "../api.js";
import { errorBox, fmt, h } from "../dom.js";

function field(label, input) {
  return h("label", {}, h("span", {}, label), input);
}

export function render(root) {
  const controller = new AbortController();
  const model = h("select", { id: "pg-model" });
  const mode = h("select", { id: "pg-mode" }, h("option", { value: "chat" }, "chat"), h("option", { value: "prompt" }, "raw prompt"));
  const system = h("textarea", { id: "pg-system", rows: 2, placeholder: "system message (optional)" });
  const text = h("textarea", { id: "pg-input", rows: 5, placeholder: "Ask something…" });
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: 1, value: 64 });
  const temperature = h("input", { id: "pg-temperature", type: "number", min: 0, max: 2, step: "any", value: 0.7 });
  const topP = h("input", { id: "pg-top-p", type: "number", min: 0.01, max: 1, step: "any", value: 1 });
  const seed = h("input", { id: "pg-seed", type: "number", min: 0, placeholder: "random" });
  const run = h("button", { type: "submit", id: "pg-run" }, "Run");
  const cancel = h("button", { type: "button", id: "pg-cancel", class: "danger", disabled: true }, "Cancel");
  const output = h("pre", { id: "pg-output", class: "output" });
  const stats = h("div", { id: "pg-stats", class: "muted" });
  const problem = h("div");
  const form = h("form", { class: "playground" },
    h("div", { class: "params" },
      field("model", model), field("mode", mode), field("max tokens", maxTokens),
      field("temperature", temperature), field("top p", topP), field("seed", seed)),
    system, text, h("div", { class: "row" }, run, cancel));
  root.append(h("h1", {}, "Playground"), form, problem, stats, output);
  mode.addEventListener("change", () => { system.hidden = mode.value !== "chat"; });

  api("/v1/models", { signal: controller.signal }).then((list) => {
    model.replaceChildren(...list.data.map((m) => h("option", { value: m.id }, `${m.id} (${m.workers} worker${m.workers === 1 ? "" : "s"})`)));
  }).catch((err) => { if (!controller.signal.aborted) problem.replaceChildren(errorBox(err)); });

  let current = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.replaceChildren();
    output.replaceChildren();
    const body = {
      model: model.value || undefined,
      max_tokens: Number(maxTokens.value) || undefined,
      temperature: Number(temperature.value),
      top_p: Number(topP.value),
    };
    if (seed.value !== "") body.seed = Number(seed.value);
    if (mode.value === "chat") {
      body.messages = [];
      if (system.value.trim()) body.messages.push({ role: "system", content: system.value });
      body.messages.push({ role: "user", content: text.value });
    } else {
      body.prompt = text.value;
    }
    const sent = performance.now();
    let firstToken = null;
    run.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body, signal: controller.signal });
      current = job.id;
      cancel.disabled = false;
      stats.replaceChildren("job ", h("a", { href: `#/job/${job.id}`, id: "pg-job" }, job.id), " · queued");
      let ended = null;
      await followJob(job.id, {
        signal: controller.signal,
        onEvent: (ev) => {
          if (ev.event === "token") {
            if (firstToken === null) firstToken = performance.now() - sent;
            output.append(document.createTextNode(ev.data.text));
          } else if (ev.event === "done" || ev.event === "error") {
            ended = ev;
          }
        },
      });
      if (ended) {
        const t = ended.data.timings || {};
        const reason = ended.event === "done" ? ended.data.finish_reason : `${ended.data.type}: ${ended.data.message}`;
        stats.replaceChildren("job ", h("a", { href: `#/job/${job.id}`, id: "pg-job" }, job.id),
          h("span", { id: "pg-result", dataset: { event: ended.event } },
            ` · ${reason} · queue ${fmt.ms(t.queue_ms)} · TTFT ${fmt.ms(t.ttft_ms)} (here: ${fmt.ms(firstToken)})` +
            ` · ${fmt.num(t.tokens_per_s)} tokens/s`));
      }
    } catch (err) {
      if (!controller.signal.aborted) problem.replaceChildren(errorBox(err));
    } finally {
      run.disabled = false;
      cancel.disabled = true;
      current = null;
    }
  });
  cancel.addEventListener("click", async () => {
    if (!current) return;
    try {
      await api(`/v1/jobs/${encodeURIComponent(current)}/cancel`, { method: "POST" });
    } catch (err) {
      problem.replaceChildren(errorBox(err));
    }
  });
  return () => controller.abort();
}
