/* Plain-SVG charts for the evosparse dashboard (no libraries: the service may run offline).
 * EvoCharts.line(svg, opts) and EvoCharts.bars(svg, opts) redraw the whole <svg> each call;
 * with at most a few thousand points that is cheap and keeps the code free of diffing. */
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const W = 640, H = 300;
  const M = { top: 14, right: 16, bottom: 42, left: 62 };

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, str, attrs) {
    const t = el("text", Object.assign({ x: x, y: y }, attrs || {}), parent);
    t.textContent = str;
    return t;
  }

  // "Nice" tick values (1, 2, 5 x 10^k steps) covering [lo, hi].
  function ticks(lo, hi, count, minStep) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = Math.max((hi - lo) / Math.max(1, count), minStep || 0);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
    return +v.toPrecision(4) + "";
  }

  function reset(svg, ariaLabel) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
    if (ariaLabel) svg.setAttribute("aria-label", ariaLabel);
  }

  function empty(svg, message) {
    reset(svg);
    text(svg, W / 2, H / 2, message, { "text-anchor": "middle", class: "chart-empty" });
  }

  function axes(svg, x0, x1, y0, y1, opts, xTicks) {
    const g = el("g", { class: "axes" }, svg);
    const sx = v => M.left + (v - x0) / (x1 - x0 || 1) * (W - M.left - M.right);
    const sy = v => H - M.bottom - (v - y0) / (y1 - y0 || 1) * (H - M.top - M.bottom);
    for (const t of ticks(y0, y1, 6)) {
      el("line", { x1: M.left, x2: W - M.right, y1: sy(t), y2: sy(t), class: "grid" }, g);
      text(g, M.left - 6, sy(t) + 4, (opts.yFormat || fmt)(t), { "text-anchor": "end", class: "tick" });
    }
    for (const t of xTicks || ticks(x0, x1, 8, opts.xInteger ? 1 : 0)) {
      if (t < x0 || t > x1) continue;
      text(g, sx(t), H - M.bottom + 16, fmt(t), { "text-anchor": "middle", class: "tick" });
    }
    el("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }, g);
    el("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }, g);
    if (opts.xLabel) text(g, (M.left + W - M.right) / 2, H - 6, opts.xLabel, { "text-anchor": "middle", class: "label" });
    if (opts.yLabel) {
      text(g, 14, (M.top + H - M.bottom) / 2, opts.yLabel,
        { "text-anchor": "middle", class: "label", transform: `rotate(-90 14 ${(M.top + H - M.bottom) / 2})` });
    }
    return { sx, sy };
  }

  // Legend in the top-right corner, inside the plot area.
  function legend(svg, series) {
    const widths = series.map(s => 28 + 7 * s.name.length);
    let x = W - M.right - widths.reduce((a, b) => a + b, 0);
    const g = el("g", { class: "legend" }, svg);
    el("rect", { x: x - 6, y: M.top - 4, width: W - M.right - x + 6, height: 20, class: "legend-bg" }, g);
    series.forEach((s, i) => {
      el("rect", { x: x, y: M.top, width: 12, height: 12, class: s.cls }, g);
      text(g, x + 16, M.top + 10, s.name, { class: "legend-text" });
      x += widths[i];
    });
  }

  /* opts: {series: [{name, cls, points: [[x, y], ...]}], xLabel, yLabel, emptyText} */
  function line(svg, opts) {
    const pts = opts.series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]));
    if (!pts.length) { empty(svg, opts.emptyText || "no data yet"); return; }
    reset(svg);
    let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
    let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
    y0 -= pad; y1 += pad;
    const { sx, sy } = axes(svg, x0, x1, y0, y1, opts);
    for (const s of opts.series) {
      const good = s.points.filter(p => Number.isFinite(p[1]));
      if (!good.length) continue;
      const d = good.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
      el("path", { d: d, class: "series " + s.cls, "data-series": s.name }, svg);
      // dots carry a <title> so hovering shows the exact value
      if (good.length <= 200) {
        for (const p of good) {
          const c = el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: "dot " + s.cls }, svg);
          el("title", {}, c).textContent = `${s.name} @ ${opts.xLabel || "x"} ${p[0]}: ${fmt(p[1])}`;
        }
      }
    }
    legend(svg, opts.series);
  }

  /* opts: {labels: [...], series: [{name, cls, values: [...], tags?: [...]}], yLabel, yMax, emptyText}
     tags (e.g. each layer's N:M pattern) are written above the bars and in their hover titles. */
  function bars(svg, opts) {
    const n = opts.labels.length;
    const all = opts.series.flatMap(s => s.values).filter(Number.isFinite);
    if (!n || !all.length) { empty(svg, opts.emptyText || "no data yet"); return; }
    reset(svg);
    const y1 = opts.yMax || Math.min(1, Math.max(...all) * 1.1);
    const step = Math.max(1, Math.ceil(n / 15));
    const xt = [];
    for (let i = 0; i < n; i += step) xt.push(i);
    const { sy } = axes(svg, -0.5, n - 0.5, 0, y1, opts, []);
    const slot = (W - M.left - M.right) / n;
    const k = opts.series.length;
    const bw = Math.max(0.6, slot * 0.8 / k);
    opts.series.forEach((s, j) => {
      const g = el("g", { class: "bars " + s.cls, "data-series": s.name }, svg);
      s.values.forEach((v, i) => {
        if (!Number.isFinite(v)) return;
        const x = M.left + i * slot + slot * 0.1 + j * bw;
        const r = el("rect", { x: x.toFixed(2), y: sy(v).toFixed(2), width: bw.toFixed(2),
          height: Math.max(0, H - M.bottom - sy(v)).toFixed(2), class: "bar " + s.cls }, g);
        const tag = s.tags && s.tags[i] ? s.tags[i] : "";
        el("title", {}, r).textContent = `${opts.labels[i]} — ${s.name}: ${(100 * v).toFixed(1)} %` + (tag ? ` (${tag})` : "");
        if (tag && n <= 40) {
          text(g, x + bw / 2, sy(v) - 3, tag, { "text-anchor": "middle", class: "bar-tag" });
        }
      });
    });
    const g = el("g", { class: "axes" }, svg);
    for (const i of xt) {
      text(g, M.left + (i + 0.5) * slot, H - M.bottom + 16, opts.shortLabels ? opts.shortLabels[i] : String(i),
        { "text-anchor": "middle", class: "tick" });
    }
    legend(svg, opts.series);
  }

  window.EvoCharts = { line, bars, ticks };
})();
