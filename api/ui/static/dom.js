// Small DOM and formatting helpers. Text always goes in as text nodes: job output is never parsed as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export function table(headings, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))),
    h("tbody", {}, rows.length ? rows : [h("tr", {}, h("td", { colspan: headings.length, class: "muted" }, "none"))]),
  );
}

export function card(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

export const fmt = {
  ms(v) { return v === null || v === undefined ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${Math.round(v)} ms`; },
  num(v, digits = 1) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); },
  time(v) {
    if (!v) return "–";
    const d = typeof v === "number" ? new Date(v * 1000) : new Date(v);
    return d.toLocaleTimeString();
  },
  short(id) { return id ? id.slice(0, 14) : "–"; },
};

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, dataset: { status } }, status);
}

export function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, err.message || String(err));
}

// Calls fn now and every `ms` while the tab is visible (paused while it is hidden, so that a background
// tab costs the API nothing); returns a function that stops it.
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    timer = null;
    if (stopped) return;
    if (document.visibilityState === "visible") {
      try { await fn(); } catch (err) { if (err.name !== "AbortError") console.warn(err); }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  const onVisible = () => { if (document.visibilityState === "visible" && timer !== null) { clearTimeout(timer); tick(); } };
  document.addEventListener("visibilitychange", onVisible);
  tick();
  return () => {
    stopped = true;
    if (timer !== null) clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisible);
  };
}
