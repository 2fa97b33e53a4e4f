// A line chart in SVG, drawn by hand: the last minutes of one figure sampled by the page.
const NS = "http://www.w3.org/2000/svg";
const W = 320;
const H = 110;
const PAD = { left: 46, right: 8, top: 8, bottom: 18 };

function el(tag, attrs) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

// points: [{t: unix seconds, v: number|null}], over the last `span` seconds.
export function lineChart(title, points, { span = 300, unit = "" } = {}) {
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  const now = Date.now() / 1000;
  const values = points.filter((p) => p.v !== null && p.v !== undefined);
  const top = niceMax(Math.max(0, ...values.map((p) => p.v)));
  const x = (t) => PAD.left + ((t - (now - span)) / span) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  for (const frac of [0, 0.5, 1]) {
    const gy = y(top * frac);
    svg.append(el("line", { x1: PAD.left, x2: W - PAD.right, y1: gy, y2: gy, class: "gridline" }));
    const label = el("text", { x: PAD.left - 4, y: gy + 3, class: "axis", "text-anchor": "end" });
    label.textContent = `${+(top * frac).toPrecision(3)}${unit}`;
    svg.append(label);
  }
  const ago = el("text", { x: PAD.left, y: H - 4, class: "axis" });
  ago.textContent = `-${Math.round(span / 60)} min`;
  const nowLabel = el("text", { x: W - PAD.right, y: H - 4, class: "axis", "text-anchor": "end" });
  nowLabel.textContent = "now";
  svg.append(ago, nowLabel);
  const shown = values.filter((p) => p.t >= now - span);
  if (shown.length) {
    const d = shown.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
    svg.append(el("path", { d, class: "line" }));
    const lastPoint = shown[shown.length - 1];
    svg.append(el("circle", { cx: x(lastPoint.t), cy: y(lastPoint.v), r: 2.5, class: "dot" }));
  }
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  const latest = shown.length ? shown[shown.length - 1].v : null;
  caption.textContent = `${title}: ${latest === null ? "–" : +latest.toPrecision(4) + unit}`;
  figure.append(caption, svg);
  return figure;
}
