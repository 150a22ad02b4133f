/* Depth x step heatmap on a plain <canvas>: per-layer gradient norm (log scale) and per-site activation
 * fractions (saturated or dead units, linear 0..1), one class for both (options).
 *
 * Hand-written on purpose: uPlot draws x/y series, not matrices, and a heatmap is only a grid of
 * filled rectangles plus a colour bar, so a library for it would add more weight than code.
 * Rows are layers in depth order (input at the top), columns are steps, colour is log10(grad norm)
 * on a viridis scale from the data's lowest to highest decade: vanishing layers are dark rows,
 * exploding steps bright columns. Non-finite values (the API sends NaN/inf as null) are marked red,
 * cells without a record are light grey. When there are more steps than pixels, steps are merged
 * into columns keeping the largest value (and any non-finite mark), so a single spike survives.
 */
(function () {
  "use strict";

  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#fde725"];
  const BAD = "#ff0040";
  const MISSING = "#eceff3";
  const LEFT_MIN = 90, RIGHT = 96, TOP = 8, BOTTOM = 28;

  function hexToRgb(hex) {
    const n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }
  const STOPS = VIRIDIS.map(hexToRgb);

  function colour(t) {
    t = Math.min(1, Math.max(0, t));
    const x = t * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(x));
    const f = x - i, a = STOPS[i], b = STOPS[i + 1];
    return "rgb(" + Math.round(a[0] + (b[0] - a[0]) * f) + "," + Math.round(a[1] + (b[1] - a[1]) * f) + "," +
      Math.round(a[2] + (b[2] - a[2]) * f) + ")";
  }

  function fmtSci(v) {
    if (v === null || v === undefined) return "NaN/inf";
    return v === 0 ? "0" : Number(v).toExponential(2);
  }

  const DEFAULTS = {
    name: (r) => r.layer,          // row label of a record
    value: (r) => r.grad_norm,     // cell value (null/NaN/inf = non-finite, shown red)
    log: true,                     // log10 colour scale over the data's decades, else linear over `range`
    range: [0, 1],
    label: "grad norm",            // tooltip
    empty: "no layer statistics yet (monitoring.layer_stats_every)",
  };

  function fmtLinear(v) {
    if (v === null || v === undefined) return "NaN/inf";
    return Number(v).toFixed(3);
  }

  class Heatmap {
    /* container: element to fill; order: function(names, positions) -> names in depth order, where
       positions maps a name to its recorded depth index (absent for rows recorded before positions);
       options: see DEFAULTS */
    constructor(container, order, options) {
      this.container = container;
      this.order = order;
      this.opts = Object.assign({}, DEFAULTS, options || {});
      this.canvas = document.createElement("canvas");
      this.tip = document.createElement("div");
      this.tip.className = "tip";
      this.tip.hidden = true;
      container.append(this.canvas, this.tip);
      this.steps = [];        // sorted distinct steps
      this.layers = [];       // depth-ordered names
      this.positions = new Map(); // name -> recorded depth index (rows without one add nothing)
      this.values = new Map(); // "step|layer" -> grad norm (null = non-finite)
      this.layout = null;
      this.canvas.addEventListener("mousemove", (e) => this.hover(e));
      this.canvas.addEventListener("mouseleave", () => { this.tip.hidden = true; });
      if (window.ResizeObserver) {
        let width = 0;
        new ResizeObserver(() => {
          if (container.clientWidth !== width) { width = container.clientWidth; this.draw(); }
        }).observe(container);
      }
    }

    reset() { this.steps = []; this.layers = []; this.positions.clear(); this.values.clear(); }

    /* rows: [{step, position, ...}] (e.g. GET /v1/jobs/{id}/metrics/layers), named and valued by the options */
    add(rows) {
      if (!rows.length) { this.draw(); return; }
      const names = new Set(this.layers), steps = new Set(this.steps);
      for (const r of rows) {
        const name = this.opts.name(r);
        names.add(name);
        if (Number.isInteger(r.position)) this.positions.set(name, r.position);
        steps.add(r.step);
        const g = this.opts.value(r);
        this.values.set(r.step + "|" + name, (typeof g === "number" && isFinite(g)) ? g : null);
      }
      this.layers = this.order(Array.from(names), this.positions);
      this.steps = Array.from(steps).sort((a, b) => a - b);
      this.draw();
    }

    draw() {
      const c = this.canvas, box = this.container;
      const width = Math.max(320, box.clientWidth);
      const rows = this.layers.length;
      const rowH = rows ? Math.max(10, Math.min(26, Math.floor(360 / rows))) : 0;
      const height = rows ? TOP + rows * rowH + BOTTOM : 60;
      const dpr = window.devicePixelRatio || 1;
      c.width = Math.round(width * dpr);
      c.height = Math.round(height * dpr);
      c.style.height = height + "px";
      const ctx = c.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, width, height);
      ctx.font = "11px system-ui, sans-serif";
      if (!rows || !this.steps.length) {
        ctx.fillStyle = "#6b7280";
        ctx.fillText(this.opts.empty, 10, 34);
        this.expose(0, 0, 0, 0);
        this.layout = null;
        return;
      }
      let left = LEFT_MIN;
      for (const name of this.layers) left = Math.max(left, ctx.measureText(name).width + 12);
      left = Math.min(left, Math.floor(width * 0.35));
      const plotW = Math.max(10, width - left - RIGHT);

      // column buckets: at most one column per pixel
      const nSteps = this.steps.length;
      const per = Math.max(1, Math.ceil(nSteps / plotW));
      const nCols = Math.ceil(nSteps / per);
      const colW = plotW / nCols;

      // value range: whole decades of the data (log), or the fixed range (linear)
      const log = this.opts.log;
      let lo = Infinity, hi = -Infinity;
      if (log) {
        for (const v of this.values.values()) {
          if (v !== null && v > 0) { const l = Math.log10(v); if (l < lo) lo = l; if (l > hi) hi = l; }
        }
        if (!isFinite(lo)) { lo = -1; hi = 1; }
        lo = Math.floor(lo); hi = Math.ceil(hi);
        if (hi - lo < 1) hi = lo + 1;
      } else {
        [lo, hi] = this.opts.range;
      }

      let cells = 0, bad = 0;
      for (let r = 0; r < rows; r++) {
        const name = this.layers[r];
        const y = TOP + r * rowH;
        for (let col = 0; col < nCols; col++) {
          let best = undefined, isBad = false;
          for (let k = col * per; k < Math.min(nSteps, (col + 1) * per); k++) {
            const key = this.steps[k] + "|" + name;
            if (!this.values.has(key)) continue;
            const v = this.values.get(key);
            if (v === null) { isBad = true; continue; }
            const l = log ? (v > 0 ? Math.log10(v) : lo) : v;
            if (best === undefined || l > best) best = l;
          }
          const x = left + col * colW;
          if (isBad) { ctx.fillStyle = BAD; bad++; }
          else if (best === undefined) ctx.fillStyle = MISSING;
          else { ctx.fillStyle = colour((best - lo) / (hi - lo)); cells++; }
          ctx.fillRect(x, y, Math.ceil(colW + 0.5), rowH - 1);
        }
        ctx.fillStyle = "#374151";
        ctx.textAlign = "right";
        ctx.textBaseline = "middle";
        ctx.fillText(this.clip(ctx, name, left - 8), left - 6, y + rowH / 2);
      }

      // step axis
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      ctx.fillStyle = "#6b7280";
      const yAxis = TOP + rows * rowH + 6;
      const ticks = Math.min(nCols, Math.max(2, Math.floor(plotW / 90)));
      for (let i = 0; i < ticks; i++) {
        const col = Math.round(i * (nCols - 1) / Math.max(1, ticks - 1));
        const step = this.steps[Math.min(nSteps - 1, col * per)];
        ctx.fillText(String(step), left + (col + 0.5) * colW, yAxis);
      }

      // colour bar with decade labels, then the two special swatches
      const barX = left + plotW + 14, barW = 12, barTop = TOP, barH = Math.max(40, rows * rowH - 34);
      for (let i = 0; i < barH; i++) {
        ctx.fillStyle = colour(1 - i / (barH - 1));
        ctx.fillRect(barX, barTop + i, barW, 1);
      }
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      ctx.fillStyle = "#374151";
      if (log) {
        const decades = hi - lo, every = Math.max(1, Math.ceil(decades / Math.max(1, Math.floor(barH / 14))));
        for (let d = lo; d <= hi; d += every) {
          ctx.fillText("1e" + d, barX + barW + 4, barTop + (1 - (d - lo) / decades) * (barH - 1));
        }
      } else {
        const parts = barH >= 80 ? 4 : barH >= 36 ? 2 : 1;  // labels at least ~18 px apart
        for (let i = 0; i <= parts; i++) {
          const v = lo + (hi - lo) * i / parts;
          ctx.fillText(String(Number(v.toPrecision(3))), barX + barW + 4, barTop + (1 - i / parts) * (barH - 1));
        }
      }
      const swY = barTop + barH + 8;
      ctx.fillStyle = BAD; ctx.fillRect(barX, swY, barW, 10);
      ctx.fillStyle = "#374151"; ctx.fillText("NaN/inf", barX + barW + 4, swY + 5);
      ctx.fillStyle = MISSING; ctx.fillRect(barX, swY + 14, barW, 10);
      ctx.fillStyle = "#374151"; ctx.fillText("no data", barX + barW + 4, swY + 19);

      this.layout = { left, rowH, colW, per, nCols, plotW };
      this.expose(cells, bad, nSteps, rows);
    }

    clip(ctx, text, maxW) {
      if (ctx.measureText(text).width <= maxW) return text;
      let t = text;
      while (t.length > 4 && ctx.measureText("…" + t).width > maxW) t = t.slice(1);
      return "…" + t;
    }

    expose(cells, bad, steps, layers) {
      const d = this.container.dataset;
      d.cells = String(cells);
      d.nonfinite = String(bad);
      d.steps = String(steps);
      d.layers = String(layers);
    }

    hover(e) {
      const L = this.layout;
      if (!L) return;
      const rect = this.canvas.getBoundingClientRect();
      const x = e.clientX - rect.left, y = e.clientY - rect.top;
      const col = Math.floor((x - L.left) / L.colW), row = Math.floor((y - TOP) / L.rowH);
      if (col < 0 || col >= L.nCols || row < 0 || row >= this.layers.length) { this.tip.hidden = true; return; }
      const name = this.layers[row];
      const step = this.steps[Math.min(this.steps.length - 1, col * L.per)];
      const key = step + "|" + name;
      const fmt = this.opts.log ? fmtSci : fmtLinear;
      const value = this.values.has(key) ? fmt(this.values.get(key)) : "no data";
      this.tip.textContent = name + " · step " + step + (L.per > 1 ? " (+" + (L.per - 1) + ")" : "") + " · " +
        this.opts.label + " " + value;
      this.tip.hidden = false;
      this.tip.style.left = Math.min(x + 12, rect.width - 260) + "px";
      this.tip.style.top = (y + 12) + "px";
    }
  }

  window.StHeatmap = Heatmap;
})();
