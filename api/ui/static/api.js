// The API client: the key (kept in this tab's session storage), JSON calls, and job event streams read
// with fetch, so that the Authorization header can be sent (a native EventSource cannot send it).
import { SseParser } from "./sse.js";

const KEY = "inferq.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type;
    this.param = error.param;
  }
}

export const auth = {
  required: false,
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) {
    if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY);
  },
  headers() {
    const key = this.key;
    return key ? { Authorization: `Bearer ${key}` } : {};
  },
  // Set by the app: asks the user for a key (after a 401).
  onUnauthorized: () => {},
};

export async function config() {
  const resp = await fetch("config.json", { cache: "no-store" });
  return resp.json();
}

export async function api(path, { method = "GET", body, signal, headers = {} } = {}) {
  const init = { method, signal, headers: { ...auth.headers(), ...headers } };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  if (!resp.ok) {
    if (resp.status === 401) auth.onUnauthorized(new ApiError(resp.status, data));
    throw new ApiError(resp.status, data);
  }
  return data;
}

// A file's content (batch output / errors) as a download: links cannot carry the Authorization header.
export async function download(fileId, name) {
  const resp = await fetch(`/v1/files/${encodeURIComponent(fileId)}/content`, { headers: auth.headers() });
  if (!resp.ok) throw new ApiError(resp.status, await resp.json());
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

const RETRY_MS = [250, 500, 1000, 2000, 4000];

// Follows a job's events until its `done` or `error`: onEvent({id, event, data}) once per event, in
// order. A dropped connection is reopened with Last-Event-ID = the last id seen, and any event at or
// below it is skipped, so that no token is lost or shown twice. Returns when the stream has ended;
// `signal` stops it. onReconnect(n) tells the page that it is reconnecting.
export async function followJob(jobId, { onEvent, onReconnect = () => {}, signal, after = 0 } = {}) {
  let last = after;
  let failures = 0;
  let reconnects = 0;
  while (!signal?.aborted) {
    const headers = { ...auth.headers(), Accept: "text/event-stream" };
    if (last > 0) headers["Last-Event-ID"] = String(last);
    let ended = false;
    try {
      const resp = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
      if (!resp.ok) {
        const body = await resp.json().catch(() => null);
        if (resp.status === 401) auth.onUnauthorized(new ApiError(resp.status, body));
        throw new ApiError(resp.status, body);
      }
      failures = 0;
      const parser = new SseParser((ev) => {
        const id = Number(ev.id);
        if (!ev.event || !(id > last)) return; // pings, and what was already shown
        last = id;
        onEvent({ id, event: ev.event, data: JSON.parse(ev.data) });
        if (ev.event === "done" || ev.event === "error") ended = true;
      });
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(value);
      }
      if (ended) {
        await reader.cancel().catch(() => {});
        return;
      }
    } catch (err) {
      if (signal?.aborted) return;
      if (err instanceof ApiError && err.status < 500 && err.status !== 429) throw err;
      failures += 1;
    }
    reconnects += 1;
    onReconnect(reconnects, last);
    await sleep(RETRY_MS[Math.min(failures, RETRY_MS.length - 1)], signal);
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}
