/* StableTrain dashboard: the jobs list and the job page, both on the public /v1 API with the user's key. */
(function () {
  "use strict";

  const KEY_STORE = "stabletrain.apiKey";
  const POLL_MS = 2000;
  // statuses that still change on their own (polled); a paused job waits for a resume
  const LIVE = new Set(["queued", "running", "pausing", "cancelling"]);
  const PAUSABLE = new Set(["queued", "running"]);
  const $ = (id) => document.getElementById(id);
  const SPIKES = new Set(["grad_norm_spike", "loss_spike"]);
  const ACT_LABELS = { saturated_frac: "saturated fraction", dead_frac: "dead fraction" };
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

  // ---------------------------------------------------------------- key + API
  function takeKeyFromUrl() {
    const url = new URL(window.location.href);
    if (!url.searchParams.has("key")) return;
    const key = (url.searchParams.get("key") || "").trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    url.searchParams.delete("key");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }

  const apiKey = () => localStorage.getItem(KEY_STORE) || "";

  function showKeyStatus() {
    const key = apiKey();
    $("key-status").hidden = !key;
    $("key-label").textContent = key ? "key " + key.slice(0, 7) + "…" : "";
  }

  let onKey = null;
  function askForKey(message) {
    if (message) $("key-message").textContent = message;
    $("key-panel").hidden = false;
    $("main").hidden = true;
    $("key-input").focus();
  }

  function setupKeyForm(start) {
    onKey = start;
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      localStorage.setItem(KEY_STORE, key);
      $("key-input").value = "";
      $("key-panel").hidden = true;
      $("main").hidden = false;
      showKeyStatus();
      if (onKey) { const f = onKey; onKey = null; f(); }
      else window.location.reload();
    });
    $("key-change").addEventListener("click", () => { onKey = null; askForKey(); });
  }

  class ApiError extends Error {
    constructor(status, body) {
      const err = body && body.error;
      super(err ? err.message : "HTTP " + status);
      this.status = status;
      this.code = err ? err.code : null;
    }
  }

  async function api(path, opts) {
    opts = opts || {};
    const headers = { Authorization: "Bearer " + apiKey(), Accept: "application/json" };
    let body;
    if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
    const res = await fetch(path, { method: opts.method || "GET", headers: headers, body: body, cache: "no-store" });
    if (res.status === 401) {
      askForKey("The API did not accept that key. Enter a valid API key.");
      throw new ApiError(401, null);
    }
    const type = res.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await res.json() : null;
    if (!res.ok) throw new ApiError(res.status, data);
    return { status: res.status, data: data };
  }

  /* A file behind the API (checkpoint, PNG): fetched with the key, handed to the browser as a blob. */
  async function downloadWithKey(url, filename, open) {
    const res = await fetch(url, { headers: { Authorization: "Bearer " + apiKey() } });
    if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
    const href = URL.createObjectURL(await res.blob());
    if (open) { window.open(href, "_blank"); setTimeout(() => URL.revokeObjectURL(href), 60000); return; }
    const a = document.createElement("a");
    a.href = href; a.download = filename;
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(href), 10000);
  }

  let bannerTimer = null;
  function showError(err) {
    if (err instanceof ApiError && err.status === 401) return;
    const b = $("error-banner");
    b.textContent = err && err.message ? err.message : String(err);
    b.hidden = false;
    clearTimeout(bannerTimer);
    bannerTimer = setTimeout(() => { b.hidden = true; }, 8000);
  }

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function num(v, digits) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(digits || 2).replace(/\.?0+e/, "e");
    return String(Number(v.toPrecision(digits || 4)));
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const u = ["B", "kB", "MB", "GB"]; let i = 0;
    while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }
  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }
  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  const badge = (kind, value) => el("span", { class: "badge", ["data-" + kind]: value || "", text: value || "" });

  /* Same depth order as app/plots/order.py: layerOrder uses the rows' recorded `position`; depthOrder is
     the name heuristic it falls back to for jobs recorded before positions existed. */
  const FIRST = ["emb", "wte", "wpe"], LAST = new Set(["head", "lm_head", "output", "out", "decoder", "fc_out", "proj_out"]);
  const PART_RANK = { tok: 0, pos: 1, ih: 0, hh: 1, q: 0, k: 1, v: 2, qkv: 0, attn: 0, in: 0, fc: 1, proj: 2, mlp: 1, ffn: 1 };
  function depthKey(name) {
    const tokens = name.toLowerCase().split(/[._]/).filter(Boolean);
    const first = tokens[0] || "";
    let group = 1;
    if (FIRST.some((p) => first.startsWith(p) || first.endsWith(p)) || first.includes("emb")) group = 0;
    else if (LAST.has(first)) group = 2;
    return [group, tokens.map((t) => /^\d+$/.test(t) ? [0, parseInt(t, 10), ""] : [1, t in PART_RANK ? PART_RANK[t] : 50, t])];
  }
  function cmpParts(a, b) {
    for (let i = 0; i < Math.min(a.length, b.length); i++) {
      for (let j = 0; j < 3; j++) {
        if (a[i][j] < b[i][j]) return -1;
        if (a[i][j] > b[i][j]) return 1;
      }
    }
    return a.length - b.length;
  }
  function depthOrder(names) {
    const keyed = names.map((n) => [depthKey(n), n]);
    keyed.sort((x, y) => (x[0][0] - y[0][0]) || cmpParts(x[0][1], y[0][1]));
    return keyed.map((k) => k[1]);
  }
  /* names: distinct layer names; positions: Map name -> depth index. By position when every name has
     one (ties by the name heuristic, then name), else the name heuristic for all (like layer_order). */
  function layerOrder(names, positions) {
    if (!names.length || !names.every((n) => positions && positions.has(n))) return depthOrder(names);
    const keyed = names.map((n) => [positions.get(n), depthKey(n), n]);
    keyed.sort((x, y) => (x[0] - y[0]) || (x[1][0] - y[1][0]) || cmpParts(x[1][1], y[1][1]) ||
      (x[2] < y[2] ? -1 : x[2] > y[2] ? 1 : 0));
    return keyed.map((k) => k[2]);
  }

  // ---------------------------------------------------------------- jobs list
  function jobsPage() {
    let cursor = null, shown = 50, timer = null;
    const body = $("jobs-body");

    function row(job) {
      const p = job.progress || {};
      const bar = el("div", { class: "progress small" }, el("div", { class: "bar" }));
      bar.firstChild.style.width = Math.round((p.fraction || 0) * 100) + "%";
      return el("tr", { "data-job-id": job.id },
        el("td", {}, el("a", { href: "/ui/jobs/" + encodeURIComponent(job.id), text: job.name || job.id })),
        el("td", {}, badge("status", job.status)),
        el("td", {}, badge("health", job.health)),
        el("td", {}, bar, el("span", { class: "small", text: (p.step || 0) + " / " + (p.max_steps || "?") })),
        el("td", { class: "small", text: when(job.created_at) }),
        el("td", { class: "mono muted", text: job.id }));
    }

    async function load(more) {
      const status = $("status-filter").value;
      const params = new URLSearchParams({ limit: String(more ? 50 : Math.min(200, shown)) });
      if (status) params.set("status", status);
      if (more && cursor) params.set("cursor", cursor);
      const { data } = await api("/v1/jobs?" + params);
      if (!more) body.replaceChildren();
      for (const job of data.items) body.append(row(job));
      cursor = data.next_cursor;
      shown = body.children.length || 50;
      $("jobs-more").hidden = !cursor;
      $("jobs-empty").hidden = body.children.length > 0;
      const live = data.items.some((j) => LIVE.has(j.status));
      clearTimeout(timer);  // every 2 s while a job is live, else every 15 s (new jobs show up)
      if (!more) timer = setTimeout(() => load(false).catch(showError), live ? POLL_MS : 15000);
    }

    $("status-filter").addEventListener("change", () => { shown = 50; load(false).catch(showError); });
    $("jobs-more").addEventListener("click", () => load(true).catch(showError));
    return () => load(false).catch(showError);
  }

  // ---------------------------------------------------------------- job page
  function badStepsPlugin(state) {
    return {
      hooks: {
        draw: [(u) => {
          if (!state.bad.length) return;
          const ctx = u.ctx, top = u.bbox.top, h = u.bbox.height, left = u.bbox.left, right = left + u.bbox.width;
          ctx.save();
          ctx.strokeStyle = "rgba(214,39,40,0.45)";
          ctx.lineWidth = Math.max(1, window.devicePixelRatio || 1);
          for (const s of state.bad) {
            const x = Math.round(u.valToPos(s, "x", true));
            if (x < left || x > right) continue;
            ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + h); ctx.stroke();
          }
          ctx.restore();
        }],
      },
    };
  }

  function jobPage() {
    const jobId = document.body.dataset.jobId;
    const base = "/v1/jobs/" + encodeURIComponent(jobId);
    const s = {
      job: null, afterStep: 0, afterLayerStep: 0, afterActStep: 0, afterEventId: 0, timer: null, loadedOnce: false,
      x: [], loss: [], val: [], gn: [], gnc: [], lr: [], bad: [], acts: [], actMetric: "saturated_frac",
      actChosen: false, clip: null, charts: {},
    };
    const heatmap = new window.StHeatmap($("heatmap"), layerOrder);
    const actHeatmap = new window.StHeatmap($("act-heatmap"), layerOrder, {
      name: (r) => r.site, value: (r) => r[s.actMetric], log: false, range: [0, 1], label: ACT_LABELS[s.actMetric],
      empty: "no activation statistics yet (monitoring.activation_stats)",
    });
    window.stDashboard = { state: s, heatmap: heatmap, actHeatmap: actHeatmap, depthOrder: depthOrder, layerOrder: layerOrder };

    function resetSeries() {
      s.afterStep = 0; s.afterLayerStep = 0; s.afterActStep = 0;
      for (const k of ["x", "loss", "val", "gn", "gnc", "lr", "bad", "acts"]) s[k] = [];
      heatmap.reset();
      actHeatmap.reset();
    }

    // ------------------------------------------------------------ activations
    /* the rows of the shown statistic: a site that does not report it (e.g. attention for dead_frac) has null */
    const reporting = (rows) => rows.filter((r) => r[s.actMetric] !== null && r[s.actMetric] !== undefined);

    function addActivations(rows) {
      s.acts.push(...rows);
      if (!s.actChosen && s.acts.length) {  // a job without saturating sites opens on dead units
        s.actChosen = true;
        const has = (key) => s.acts.some((r) => r[key] !== null && r[key] !== undefined);
        if (!has("saturated_frac") && has("dead_frac")) { setActMetric("dead_frac"); return; }
      }
      actHeatmap.add(reporting(rows));
      updateSiteCharts();
    }

    function setActMetric(metric) {
      s.actMetric = metric;
      actHeatmap.opts.label = ACT_LABELS[metric];
      $("act-" + (metric === "dead_frac" ? "dead" : "saturated")).checked = true;
      $("act-heatmap").dataset.metric = metric;
      actHeatmap.reset();
      actHeatmap.add(reporting(s.acts));
      updateSiteCharts();
    }
    for (const input of document.querySelectorAll("input[name=act-metric]")) {
      input.addEventListener("change", () => { if (input.checked) setActMetric(input.value); });
    }
    $("act-heatmap").dataset.metric = s.actMetric;

    /* one line per site of `kind` (depth order) over the steps: [x, ...values]; only sites with a value */
    function siteSeries(kind, key, positive) {
      const rows = s.acts.filter((r) => r.kind === kind && typeof r[key] === "number" && isFinite(r[key]) &&
        (!positive || r[key] > 0));
      const pos = new Map(rows.map((r) => [r.site, r.position]));
      const sites = Array.from(pos.keys()).sort((a, b) => (pos.get(a) - pos.get(b)) || (a < b ? -1 : 1));
      const x = Array.from(new Set(rows.map((r) => r.step))).sort((a, b) => a - b);
      const col = new Map(x.map((v, i) => [v, i])), line = new Map(sites.map((n, i) => [n, i]));
      const ys = sites.map(() => x.map(() => null));
      for (const r of rows) ys[line.get(r.site)][col.get(r.step)] = r[key];
      return { sites: sites, data: [x].concat(ys) };
    }

    function siteChart(name, panelId, chartId, kind, key, log, yLabel) {
      const { sites, data } = siteSeries(kind, key, log);
      const box = $(chartId);
      box.dataset.points = String(data[0].length);
      box.dataset.series = String(sites.length);
      $(panelId).hidden = !sites.length;
      let chart = s.charts[name];
      const same = chart && chart.series.length - 1 === sites.length &&
        sites.every((n, i) => chart.series[i + 1].label === n);
      if (same) { chart.setData(data); return; }
      if (chart) { chart.destroy(); delete s.charts[name]; }
      if (!sites.length) return;
      s.charts[name] = new window.uPlot({
        width: chartWidth(chartId), height: 260, scales: { x: { time: false }, y: log ? { distr: 3, log: 10 } : {} },
        series: [{ label: "step" }].concat(sites.map((n, i) => ({
          label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true, value: (u, v) => num(v, 3) }))),
        axes: [{ label: "step" }, { label: yLabel, size: 70, values: (u, vals) => vals.map((v) => num(v, 2)) }],
        cursor: { drag: { x: true, y: false } }, legend: { live: true },
      }, data, box);
    }

    function updateSiteCharts() {
      siteChart("gradTime", "grad-time-panel", "chart-grad-time", "recurrent", "grad_time_ratio", true, "ratio (log)");
      siteChart("attn", "attn-panel", "chart-attn", "attention", "attn_max_logit", false, "max logit");
    }

    const positive = (v) => (typeof v === "number" && v > 0 ? v : null);

    function addSteps(rows) {
      for (const r of rows) {
        s.x.push(r.step);
        s.loss.push(r.loss);
        s.val.push(r.val_loss);
        s.gn.push(positive(r.grad_norm));
        s.gnc.push(positive(r.grad_norm_clipped));
        s.lr.push(r.lr);
        if (r.nonfinite || r.skipped) s.bad.push(r.step);
      }
    }

    function chartWidth(id) { return Math.max(300, $(id).clientWidth); }

    function makeCharts() {
      const common = (id) => ({
        width: chartWidth(id), height: 260, scales: { x: { time: false } }, plugins: [badStepsPlugin(s)],
        cursor: { drag: { x: true, y: false } }, legend: { live: true },
      });
      s.charts.loss = new window.uPlot(Object.assign(common("chart-loss"), {
        series: [{ label: "step" },
          { label: "train loss", stroke: "#1f77b4", width: 1 },
          { label: "validation loss", stroke: "#ff7f0e", width: 2, spanGaps: true, points: { show: true, size: 6 } }],
        axes: [{ label: "step" }, { label: "loss", size: 60 }],
      }), lossData(), $("chart-loss"));
      const gradSeries = [{ label: "step" },
        { label: "before clipping", stroke: "#1f77b4", width: 1 },
        { label: "after clipping", stroke: "#2ca02c", width: 1 }];
      if (s.clip) gradSeries.push({ label: "clip max_norm " + s.clip, stroke: "#d62728", width: 1.5, dash: [6, 4], points: { show: false } });
      s.charts.grad = new window.uPlot(Object.assign(common("chart-grad"), {
        series: gradSeries,
        scales: { x: { time: false }, y: { distr: 3, log: 10 } },
        axes: [{ label: "step" }, { label: "grad norm (log)", size: 70 }],
      }), gradData(), $("chart-grad"));
      s.charts.lr = new window.uPlot(Object.assign(common("chart-lr"), {
        series: [{ label: "step" }, { label: "learning rate", stroke: "#9467bd", width: 1.5, value: (u, v) => num(v, 3) }],
        axes: [{ label: "step" }, { label: "lr", size: 70, values: (u, vals) => vals.map((v) => num(v, 2)) }],
      }), [s.x, s.lr], $("chart-lr"));
      if (window.ResizeObserver) {
        for (const [name, id] of [["loss", "chart-loss"], ["grad", "chart-grad"], ["lr", "chart-lr"]]) {
          let w = 0;
          new ResizeObserver(() => {
            const nw = chartWidth(id);
            if (nw !== w) { w = nw; s.charts[name].setSize({ width: nw, height: 260 }); }
          }).observe($(id));
        }
      }
    }

    const lossData = () => [s.x, s.loss, s.val];
    const gradData = () => {
      const d = [s.x, s.gn, s.gnc];
      if (s.clip) d.push(s.x.map(() => s.clip));
      return d;
    };

    function updateCharts() {
      if (!s.charts.loss) {
        if (!s.x.length) return;
        makeCharts();
      } else {
        s.charts.loss.setData(lossData());
        s.charts.grad.setData(gradData());
        s.charts.lr.setData([s.x, s.lr]);
      }
      const n = String(s.x.length);
      for (const id of ["chart-loss", "chart-grad", "chart-lr"]) $(id).dataset.points = n;
      $("chart-loss").dataset.valPoints = String(s.val.filter((v) => v !== null && v !== undefined).length);
    }

    function renderJob(job) {
      s.job = job;
      document.title = (job.name || job.id) + " · StableTrain";
      $("job-name").textContent = job.name || job.id;
      const st = $("job-status"); st.textContent = job.status; st.dataset.status = job.status;
      const he = $("job-health"); he.textContent = job.health || ""; he.dataset.health = job.health || "";
      const p = job.progress || {};
      $("job-bar").style.width = Math.round((p.fraction || 0) * 100) + "%";
      const latest = job.latest || {};
      const facts = [
        ["step", (p.step || 0) + " / " + (p.max_steps || "?")],
        ["tokens", p.tokens_seen !== undefined ? p.tokens_seen.toLocaleString() : "–"],
        ["eta", LIVE.has(job.status) ? duration(p.eta_s) : "–"],
        ["loss", num(latest.loss)],
        ["val loss", num(latest.val_loss)],
        ["grad norm", num(latest.grad_norm)],
        ["lr", num(latest.lr, 3)],
        ["tokens/s", latest.tokens_per_s ? Math.round(latest.tokens_per_s).toLocaleString() : "–"],
        ["model", job.spec && job.spec.model ? job.spec.model.arch + " × " + job.spec.model.n_layers : "–"],
        ["created", when(job.created_at)],
        ["finished", when(job.finished_at)],
      ];
      $("job-facts").replaceChildren(...facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
      const err = $("job-error");
      err.hidden = !job.error;
      err.textContent = job.error || "";
      const clip = job.spec && job.spec.stabilization && job.spec.stabilization.clip;
      s.clip = clip && clip.mode === "norm" && typeof clip.max_norm === "number" ? clip.max_norm : null;
      $("clip-note").textContent = clip ? (s.clip ? "clip: norm ≤ " + s.clip + " (dashed)" : "clip: " + clip.mode) : "";
      $("job-pause").hidden = !PAUSABLE.has(job.status);
      $("job-resume").hidden = job.status !== "paused";
    }

    /* Pause or resume, then follow the job again (polling stops while it is paused). */
    async function act(action) {
      const buttons = [$("job-pause"), $("job-resume")];
      buttons.forEach((b) => { b.disabled = true; });
      try {
        const { data } = await api(base + "/" + action, { method: "POST" });
        renderJob(data);
        clearTimeout(s.timer);
        tick();
      } catch (err) {
        showError(err);
      } finally {
        buttons.forEach((b) => { b.disabled = false; });
      }
    }
    $("job-pause").addEventListener("click", () => act("pause"));
    $("job-resume").addEventListener("click", () => act("resume"));

    function evidenceText(value) {
      if (value === null || value === undefined) return "–";
      if (typeof value === "number") return num(value);
      if (Array.isArray(value)) return value.map(evidenceText).join(", ");
      if (typeof value === "object") return Object.entries(value).map(([k, v]) => k + " " + evidenceText(v)).join(", ");
      return String(value);
    }

    function renderDiagnosis(d) {
      // job.health is the worst severity among the findings: badge and panel read that one field
      $("diag-summary").replaceChildren(d.health ? badge("health", d.health) : "");
      const he = $("job-health"); he.textContent = d.health || ""; he.dataset.health = d.health || "";
      const box = $("diagnosis");
      const findings = d.findings || [];
      if (!findings.length) {
        const healthy = !LIVE.has(d.status) && d.health === "ok";
        box.replaceChildren(el("p", { class: healthy ? "healthy" : "muted", text: d.summary || "no findings" }));
        box.dataset.findings = "0";
        return;
      }
      box.replaceChildren(...findings.map((f) => {
        const recs = (f.recommendations || []);
        const steps = f.steps ? (f.steps.first === f.steps.last ? "step " + f.steps.first : "steps " + f.steps.first + "–" + f.steps.last) : null;
        const layers = (f.layers || []).length ? "layers: " + f.layers.join(", ") : null;
        return el("article", { class: "finding", "data-severity": f.severity, "data-kind": f.kind },
          el("h3", {}, badge("severity", f.severity), el("span", { text: f.kind })),
          el("p", { text: f.summary }),
          (steps || layers) ? el("p", { class: "small muted", text: [steps, layers].filter(Boolean).join(" · ") }) : null,
          f.evidence && Object.keys(f.evidence).length ? el("p", {
            class: "evidence",
            text: Object.entries(f.evidence).map(([k, v]) => k + ": " + evidenceText(v)).join(" · "),
          }) : null,
          recs.length ? el("table", { class: "table small recs" },
            el("thead", {}, el("tr", {}, el("th", { text: "recommended change" }), el("th", { text: "value" }), el("th", { text: "why" }))),
            el("tbody", {}, ...recs.map((r) => el("tr", { class: "rec" },
              el("td", {}, el("code", { text: r.field })),
              el("td", {}, el("code", { text: JSON.stringify(r.value) })),
              el("td", { text: r.why }))))) : null);
      }));
      box.dataset.findings = String(findings.length);
    }

    /* a spike event's batch rows with the highest loss (data.attribution.top): where in the data it came from */
    function attribution(e) {
      const a = e.data && e.data.attribution;
      const top = a && Array.isArray(a.top) ? a.top : [];
      if (!SPIKES.has(e.kind) || !top.length) return null;
      return el("table", { class: "table small attribution" },
        el("thead", {}, el("tr", {}, el("th", { text: "offset" }), el("th", { text: "loss" }), el("th", { text: "excerpt" }))),
        el("tbody", {}, ...top.slice(0, 10).map((t) => el("tr", { class: "attr-row" },
          el("td", { class: "mono", text: String(t.offset) }), el("td", { text: num(t.loss) }),
          el("td", { class: "excerpt", text: t.excerpt === undefined || t.excerpt === null ? "" : String(t.excerpt) })))));
    }

    function renderEvents(items) {
      const tbody = $("events-body");
      for (const e of items) {
        tbody.prepend(el("tr", { "data-kind": e.kind },
          el("td", { text: e.step === null ? "–" : String(e.step) }),
          el("td", {}, el("code", { text: e.kind })),
          el("td", {}, e.message, attribution(e)),
          el("td", { class: "muted", text: when(e.created_at) })));
      }
      while (tbody.children.length > 500) tbody.lastChild.remove();  // newest 500 on the page
    }

    function renderCheckpoints(items) {
      $("ckpt-empty").hidden = items.length > 0;
      $("ckpt-body").replaceChildren(...items.slice().reverse().map((c) => {
        const name = jobId + "_step_" + c.step + ".pt";
        const link = el("a", { href: c.download_url, class: "ckpt-download", text: "download", "data-step": String(c.step) });
        link.addEventListener("click", (e) => {
          e.preventDefault();
          downloadWithKey(c.download_url, name, false).catch(showError);
        });
        return el("tr", {},
          el("td", { text: String(c.step) }), el("td", { text: bytes(c.bytes) }), el("td", { text: num(c.val_loss) }),
          el("td", {}, badge("health", c.health)), el("td", { class: "mono muted", title: c.sha256, text: (c.sha256 || "").slice(0, 12) }),
          el("td", {}, link));
      }));
    }

    /* every row after `param`=start: the first page from there, the next ones from each page's next_cursor
       (the full key of its last row, so a page ending inside a step loses nothing). A step's rows are written
       in one transaction, so the next poll can start after the last step seen. */
    async function pageAll(path, param, start, limit) {
      const items = [];
      let query = param + "=" + start;
      for (let i = 0; i < 400; i++) {
        const { data } = await api(base + path + "?" + query + "&limit=" + limit);
        items.push(...data.items);
        if (!data.next_cursor) break;
        query = "cursor=" + encodeURIComponent(data.next_cursor);
      }
      return items;
    }

    async function refresh() {
      const { data: job } = await api(base);
      renderJob(job);
      // events first: a rollback rewrites steps already shown, so the series are reloaded
      const events = await pageAll("/events", "after_id", s.afterEventId, 1000);
      if (events.length) {
        if (s.loadedOnce && events.some((e) => e.kind === "rollback")) resetSeries();
        s.afterEventId = events[events.length - 1].id;
        renderEvents(events);
      }
      const steps = await pageAll("/metrics", "after_step", s.afterStep, 5000);
      if (steps.length) { addSteps(steps); s.afterStep = steps[steps.length - 1].step; }
      const layers = await pageAll("/metrics/layers", "after_step", s.afterLayerStep, 5000);
      if (layers.length) { heatmap.add(layers); s.afterLayerStep = layers[layers.length - 1].step; }
      const acts = await pageAll("/metrics/activations", "after_step", s.afterActStep, 5000);
      if (acts.length) { addActivations(acts); s.afterActStep = acts[acts.length - 1].step; }
      else if (!s.loadedOnce) actHeatmap.add([]);
      updateCharts();
      const [{ data: diag }, { data: ckpts }] = await Promise.all([api(base + "/diagnosis"), api(base + "/checkpoints")]);
      renderDiagnosis(diag);
      renderCheckpoints(ckpts.items);
      s.loadedOnce = true;
      document.body.dataset.loaded = "true";
      document.body.dataset.jobStatus = job.status;
      return LIVE.has(job.status);
    }

    async function tick() {
      let live = true;
      try {
        live = await refresh();
      } catch (err) {
        showError(err);
        if (err instanceof ApiError && (err.status === 401 || err.status === 404)) live = false;
      }
      // one timer at a time: a pause or resume starts a tick while another may be in flight
      clearTimeout(s.timer);
      if (live) s.timer = setTimeout(tick, POLL_MS);
    }

    for (const a of document.querySelectorAll(".png-link")) {
      a.addEventListener("click", (e) => {
        e.preventDefault();
        downloadWithKey(a.href, jobId + "_" + a.dataset.plot + ".png", true).catch(showError);
      });
    }

    $("sample-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const go = $("sample-go"), status = $("sample-status"), out = $("sample-out");
      const body = {
        prompt: $("sample-prompt").value,
        max_new_tokens: parseInt($("sample-tokens").value, 10) || 200,
        temperature: parseFloat($("sample-temp").value) || 0,
      };
      if ($("sample-topk").value) body.top_k = parseInt($("sample-topk").value, 10);
      if ($("sample-step").value) body.step = parseInt($("sample-step").value, 10);
      go.disabled = true;
      status.textContent = "sampling…";
      try {
        let { data } = await api(base + "/samples?wait=10", { method: "POST", json: body });
        const deadline = Date.now() + 120000;
        while ((data.status === "queued" || data.status === "running") && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 1000));
          ({ data } = await api(base + "/samples/" + encodeURIComponent(data.id)));
        }
        status.textContent = data.status === "succeeded"
          ? "from checkpoint step " + data.checkpoint_step
          : "sample " + data.status + (data.error ? ": " + data.error : "");
        out.hidden = !data.text;
        out.textContent = data.text || "";
      } catch (err) {
        status.textContent = err.message;
      } finally {
        go.disabled = false;
      }
    });

    return tick;
  }

  // ---------------------------------------------------------------- start
  function main() {
    takeKeyFromUrl();
    showKeyStatus();
    const page = document.body.dataset.page;
    const start = page === "job" ? jobPage() : jobsPage();
    setupKeyForm(start);
    if (apiKey()) start();
    else askForKey();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
