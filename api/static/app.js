/* evosparse dashboard: a single page over the REST API (/v1), with hash routes
 *   #/                 the team's jobs (search, sort by a column, tick jobs to compare)
 *   #/jobs/<id>        one job: live fitness chart, per-unit sparsity, perplexity table, artifacts, CSV export
 *   #/compare/<id>,<id>,...  two or more jobs: fitness curves overlaid, per-unit sparsity side by side,
 *                      one perplexity table
 * It polls every 2 s (no reload) and stops polling a job once it is finished. The API key lives
 * in localStorage and goes out only as an Authorization header to this same origin.
 * All server-provided strings are inserted with textContent, never as HTML. */
(function () {
  "use strict";

  const KEY_STORE = "evosparse.apiKey";
  const POLL_MS = 2000;
  const PAGE = 25;
  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
  const $ = id => document.getElementById(id);

  let loop = 0;            // bumps on every route change so a stale poll loop ends itself
  let listOffset = 0;
  let listStatus = "";
  let listSort = "-created_at";   // a column of jobs.listing.SORT_KEYS, '-' in front: descending
  let listSearch = "";
  const picked = new Set();       // job ids ticked for the comparison view
  const COMPARE_MAX = 6;          // one colour each (style.css --c0 .. --c5)

  // ---------------------------------------------------------------- API access

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

  // Paths are relative ("v1/..."), so the dashboard also works behind a reverse-proxy prefix.
  function apiUrl(path) { return path.startsWith("/") ? path.slice(1) : path; }

  async function api(path, options) {
    const opts = Object.assign({ headers: {} }, options || {});
    opts.headers = Object.assign({ Authorization: "Bearer " + apiKey(), Accept: "application/json" }, opts.headers);
    let res;
    try {
      res = await fetch(apiUrl(path), opts);
    } catch (err) {
      throw new ApiError(0, "cannot reach the service (" + err.message + ")");
    }
    if (!res.ok) {
      let detail = res.statusText;
      try {
        const body = await res.json();
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
      } catch (_) { /* not JSON */ }
      throw new ApiError(res.status, detail);
    }
    return res.json();
  }

  function setConn(state, text) {
    const c = $("conn");
    c.className = "conn " + state;
    c.textContent = text;
  }

  // ---------------------------------------------------------------- formatting helpers

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }

  const pct = v => (v === null || v === undefined || !Number.isFinite(+v)) ? "–" : (100 * v).toFixed(1) + " %";
  // A job's target: a sparsity, or a size budget in bits per weight (bits_per_weight jobs).
  const target = spec => (spec.bits_per_weight !== null && spec.bits_per_weight !== undefined)
    ? spec.bits_per_weight + " bits/weight" : pct(spec.sparsity);
  const num = (v, d) => (v === null || v === undefined || !Number.isFinite(+v)) ? "–" : (+v).toFixed(d === undefined ? 3 : d);

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(+seconds)) return "–";
    const s = Math.round(seconds);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function bytes(n) {
    if (!Number.isFinite(+n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  function badge(status) {
    return h("span", { class: "badge " + String(status || "").toLowerCase() }, status || "?");
  }

  function progressBar(frac, cls) {
    const bar = h("div", { class: "progress " + (cls || "") }, h("div", {}));
    bar.firstChild.style.width = Math.max(0, Math.min(100, 100 * (frac || 0))).toFixed(1) + "%";
    return bar;
  }

  // ---------------------------------------------------------------- views

  function show(view) {
    for (const id of ["key-view", "list-view", "job-view", "compare-view"]) $(id).hidden = id !== view;
    $("forget-key").hidden = view === "key-view";
  }

  function needKey(message) {
    loop++;
    show("key-view");
    $("key-error").hidden = !message;
    $("key-error").textContent = message || "";
    setConn("bad", message ? "key rejected" : "no key");
    $("key-input").focus();
  }

  function poll(fn) {
    const mine = ++loop;
    const tick = async () => {
      if (mine !== loop) return;
      let again = true;
      try {
        again = (await fn()) !== false;
        setConn("ok", again ? "live" : "finished");
      } catch (err) {
        if (mine !== loop) return;
        if (err.status === 401 || err.status === 403) { needKey("The service rejected this API key (" + err.message + ")."); return; }
        setConn("bad", err.status ? "error " + err.status : "retrying…");
        if (err.status === 404) { again = false; }
        console.warn(err);
      }
      if (again && mine === loop) setTimeout(tick, POLL_MS);
    };
    tick();
  }

  // ------------------------------ job list

  async function refreshList() {
    const q = new URLSearchParams({ limit: PAGE, offset: listOffset, sort: listSort });
    if (listStatus) q.set("status", listStatus);
    if (listSearch) q.set("q", listSearch);
    const page = await api("v1/jobs?" + q);
    const body = $("jobs-table").tBodies[0];
    body.replaceChildren(...page.items.map(jobRow));
    $("jobs-empty").hidden = page.items.length > 0;
    $("jobs-table").hidden = page.items.length === 0;
    const total = page.total || 0;
    $("page-info").textContent = total ? `${listOffset + 1}–${listOffset + page.items.length} of ${total}` : "";
    $("prev-page").disabled = listOffset === 0;
    $("next-page").disabled = listOffset + PAGE >= total;
    for (const th of document.querySelectorAll("#jobs-table th.sortable")) {
      const key = th.dataset.sort;
      th.classList.toggle("sorted-asc", listSort === key);
      th.classList.toggle("sorted-desc", listSort === "-" + key);
    }
    updateCompareButton();
    return true;
  }

  function updateCompareButton() {
    const n = picked.size;
    $("compare-btn").disabled = n < 2 || n > COMPARE_MAX;
    $("compare-btn").textContent = n ? `Compare (${n})` : "Compare";
  }

  function labelTags(labels) {
    return Object.entries(labels || {}).map(([k, v]) => h("span", { class: "label-tag" }, v ? k + "=" + v : k));
  }

  function jobRow(job) {
    const spec = job.spec || {};
    const link = h("a", { href: "#/jobs/" + encodeURIComponent(job.id), class: "mono" }, job.id.slice(0, 8));
    const prog = h("td", {}, progressBar(job.progress, "small"),
      h("span", { class: "muted small" }, " " + Math.round(100 * (job.progress || 0)) + " %"));
    const pick = h("input", { type: "checkbox", class: "compare-pick", "aria-label": "compare " + job.id });
    pick.checked = picked.has(job.id);
    pick.addEventListener("change", () => {
      if (pick.checked) picked.add(job.id); else picked.delete(job.id);
      updateCompareButton();
    });
    const tr = h("tr", { "data-job-id": job.id, "data-status": job.status },
      h("td", {}, pick), h("td", {}, link), h("td", { class: "job-name" }, job.name || "", " ", ...labelTags(job.labels)),
      h("td", {}, spec.model || "–"), h("td", {}, target(spec)),
      h("td", {}, spec.pruner || "–"), h("td", {}, spec.allocation || "–"), h("td", {}, badge(job.status)),
      prog, h("td", {}, num(job.best_fitness, 4)), h("td", { class: "small" }, when(job.created_at)));
    tr.addEventListener("click", ev => {
      if (ev.target.tagName !== "A" && ev.target.tagName !== "INPUT") location.hash = "#/jobs/" + job.id;
    });
    return tr;
  }

  function showList() {
    show("list-view");
    document.title = "evosparse — jobs";
    poll(refreshList);
  }

  // ------------------------------ one job

  function fact(dl, label, value) {
    dl.appendChild(h("dt", {}, label));
    dl.appendChild(h("dd", {}, value));
  }

  function renderFacts(job) {
    const spec = job.spec || {};
    const report = job.report || {};
    $("job-title").textContent = "Job " + job.id.slice(0, 8);
    $("job-title").title = job.id;
    $("job-status").replaceWith(Object.assign(badge(job.status), { id: "job-status" }));
    $("job-progress-bar").style.width = (100 * (job.progress || 0)).toFixed(1) + "%";
    const dl = $("job-facts");
    dl.replaceChildren();
    fact(dl, "model", spec.model || "–");
    fact(dl, "target", target(spec) + (report.global_sparsity !== undefined
      ? "  (measured " + pct(report.global_sparsity) + ")" : ""));
    fact(dl, "pruner / allocation", (spec.pruner || "–") + " / " + (spec.allocation || "–"));
    fact(dl, "pattern", spec.pattern || "unstructured");
    if ((spec.eval_tasks || []).length) {
      fact(dl, "eval tasks", spec.eval_tasks.join(", ") + (spec.eval_tasks_limit ? " (" + spec.eval_tasks_limit + " items each)" : ""));
    }
    const prov = report.provenance;
    if (prov && prov.source) {
      fact(dl, "source", (prov.source.name || spec.model) + (prov.compute ? "  on " + prov.compute.device + ", " + prov.compute.dtype : ""));
      if (prov.stop_reason) fact(dl, "search stopped by", prov.stop_reason);
    }
    fact(dl, "stage", (job.stage || "–") + "  " + Math.round(100 * (job.progress || 0)) + " %");
    if (job.generations_total || job.generation !== null && job.generation !== undefined) {
      fact(dl, "generation", (job.generation ?? "–") + " / " + (job.generations_total ?? "–"));
    }
    fact(dl, "best fitness", num(job.best_fitness, 5));
    if (!TERMINAL.has(job.status)) fact(dl, "time left", job.eta_seconds ? "≈ " + duration(job.eta_seconds) : "–");
    fact(dl, "created", when(job.created_at));
    fact(dl, "started", when(job.started_at));
    fact(dl, "finished", when(job.finished_at));
    fact(dl, "attempts / worker", (job.attempts ?? "–") + " / " + (job.worker || "–"));
    const err = $("job-error");
    err.hidden = !job.error;
    err.textContent = job.error ? "Error: " + job.error : "";
    $("cancel-job").hidden = TERMINAL.has(job.status);
    $("job-spec").textContent = JSON.stringify(spec, null, 2);
  }

  function renderFitness(job, generations) {
    const fitness = ((job.spec || {}).search || {}).fitness || "kl";
    const label = fitness === "ppl" ? "perplexity" : "KL divergence from dense";
    $("fitness-note").textContent = label + " of candidate sparsity vectors (lower is better)";
    const evolutionary = (job.spec || {}).allocation === "evolutionary";
    EvoCharts.line($("fitness-chart"), {
      xLabel: "generation",
      xInteger: true,
      yLabel: fitness === "ppl" ? "perplexity" : "KL",
      emptyText: evolutionary ? "waiting for the first generation…" : "no search: allocation is " + (job.spec || {}).allocation,
      series: [
        { name: "best", cls: "s-best", points: generations.map(g => [g.generation, g.best]) },
        { name: "mean", cls: "s-mean", points: generations.map(g => [g.generation, g.mean]) },
        // The parent on held-out calibration windows: a gap growing against "best" is overfitting.
        ...(generations.some(g => g.val !== null && g.val !== undefined)
          ? [{ name: "validation", cls: "s-val", points: generations.filter(g => g.val !== null && g.val !== undefined)
            .map(g => [g.generation, g.val]) }]
          : []),
      ],
    });
  }

  // Per-unit sparsity: the finished search's best vector (with unit names) beside the uniform one,
  // or, while running, the latest generation's best vector beside the target; for jobs without a
  // search, the allocation the report measured per linear layer.
  function renderSparsity(job, generations) {
    const spec = job.spec || {};
    const search = (job.report || {}).search;
    let labels = [], best = [], uniform = [], note = "", bestName = "searched";
    if (search && Array.isArray(search.best_vector) && search.best_vector.length) {
      best = search.best_vector;
      labels = Array.isArray(search.units) && search.units.length === best.length ? search.units : best.map((_, i) => "unit " + i);
      uniform = Array.isArray(search.uniform_vector) && search.uniform_vector.length === best.length
        ? search.uniform_vector : best.map(() => spec.sparsity);
      note = `best vector found by the search (${best.length} units) vs uniform ${pct(spec.sparsity)}`;
    } else if (generations.length && Array.isArray(generations[generations.length - 1].best_vector)) {
      const last = generations[generations.length - 1];
      best = last.best_vector;
      labels = best.map((_, i) => "unit " + i);
      uniform = best.map(() => spec.sparsity);
      bestName = "best so far";
      note = `best vector of generation ${last.generation} vs uniform ${pct(spec.sparsity)} (updates live)`;
    } else if (job.report && job.report.layer_sparsity) {
      labels = Object.keys(job.report.layer_sparsity);
      best = labels.map(k => job.report.layer_sparsity[k]);
      uniform = labels.map(() => spec.sparsity);
      bestName = spec.allocation || "allocated";
      note = `measured sparsity per linear layer (${spec.allocation}) vs the target`;
    }
    // Mixed / N:M jobs: each bar carries its layer's pattern (report.layer_pattern is per linear;
    // a search unit such as a block takes the pattern of its linears).
    const lp = (job.report || {}).layer_pattern;
    let tags = null;
    if (lp && spec.pattern && spec.pattern !== "unstructured") {
      const entries = Object.entries(lp);
      tags = labels.map(l => lp[l] || (entries.find(([k]) => k.startsWith(l + ".")) || [null, ""])[1]);
      note += " — bar labels: each layer's N:M pattern";
    }
    $("sparsity-note").textContent = note;
    const short = labels.map((l, i) => {
      const m = /layers?\.(\d+)/.exec(l) || /h\.(\d+)/.exec(l);
      return m ? m[1] : String(i);
    });
    EvoCharts.bars($("sparsity-chart"), {
      labels: labels,
      shortLabels: short,
      xLabel: "block",
      yLabel: "sparsity",
      yFormat: v => Math.round(100 * v) + "%",
      emptyText: TERMINAL.has(job.status) ? "no per-unit data in this job" : "waiting for the search…",
      series: [
        { name: bestName, cls: "s-best", values: best, tags: tags },
        { name: "uniform", cls: "s-uniform", values: uniform },
      ],
    });
  }

  function renderReport(job) {
    const report = job.report;
    const card = $("ppl-card");
    if (!report || !report.perplexity) { card.hidden = true; return; }
    card.hidden = false;
    const ppl = report.perplexity;
    const dense = ppl.dense;
    const rows = [["dense", dense]];
    if (ppl.uniform !== undefined && ppl.uniform !== null) rows.push(["uniform " + pct(report.sparsity_target ?? (job.spec || {}).sparsity), ppl.uniform]);
    const alloc = report.allocation || (job.spec || {}).allocation;
    rows.push([(alloc === "evolutionary" ? "searched" : alloc || "pruned") + " " + pct(report.global_sparsity), ppl.pruned]);
    $("ppl-table").tBodies[0].replaceChildren(...rows.map(([name, v]) => h("tr", { "data-row": name.split(" ")[0] },
      h("td", {}, name), h("td", { class: "num" }, num(v, 2)),
      h("td", { class: "num" }, name === "dense" || !dense ? "" : "×" + num(v / dense, 2)))));
    const timings = Object.entries(report.timings || {});
    if (report.search && report.search.seconds !== undefined && !(report.timings || {}).search) timings.push(["search", report.search.seconds]);
    $("timing-table").hidden = timings.length === 0;
    $("timing-table").tBodies[0].replaceChildren(...timings.map(([k, v]) =>
      h("tr", {}, h("td", {}, k), h("td", { class: "num" }, num(v, 1)))));
  }

  // lm-eval task accuracy (report.lm_eval.results: task -> {samples, dense, pruned}).
  function renderTasks(job) {
    const results = ((job.report || {}).lm_eval || {}).results || {};
    const names = Object.keys(results);
    $("tasks-card").hidden = names.length === 0;
    const cell = m => !m || m.acc === undefined ? "–"
      : num(100 * m.acc, 1) + " %" + (m.acc_norm !== undefined ? " (" + num(100 * m.acc_norm, 1) + " %)" : "");
    $("tasks-table").tBodies[0].replaceChildren(...names.map(name => h("tr", { "data-task": name },
      h("td", {}, name), h("td", { class: "num" }, String(results[name].samples ?? "–")),
      h("td", { class: "num" }, cell(results[name].dense)), h("td", { class: "num" }, cell(results[name].pruned)))));
  }

  async function download(item) {
    // A plain link cannot send the Authorization header, so fetch the bytes and save them.
    const res = await fetch(apiUrl(item.url), { headers: { Authorization: "Bearer " + apiKey() } });
    if (!res.ok) { alert(`download of ${item.name} failed: HTTP ${res.status}`); return; }
    const blob = await res.blob();
    const a = h("a", { href: URL.createObjectURL(blob), download: item.name.split("/").pop() });
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  function renderArtifacts(job, items) {
    $("artifacts-card").hidden = !items.length;
    $("artifacts-table").tBodies[0].replaceChildren(...items.map(item => {
      item.url = item.url || `v1/jobs/${encodeURIComponent(job.id)}/artifacts/${encodeURIComponent(item.name)}`;
      const link = h("a", { href: apiUrl(item.url), class: "artifact", "data-name": item.name }, item.name);
      link.addEventListener("click", ev => { ev.preventDefault(); download(item); });
      return h("tr", {}, h("td", {}, link), h("td", { class: "num" }, bytes(item.size)),
        h("td", { class: "mono small", title: item.sha256 || "" }, (item.sha256 || "").slice(0, 12)));
    }));
    const origin = location.origin + location.pathname.replace(/[^/]*$/, "");
    $("curl-hint").textContent = `curl -OJ -H "Authorization: Bearer $EVOSPARSE_API_KEY" ${origin}v1/jobs/${job.id}/artifacts/report.json`;
  }

  function showJob(id) {
    show("job-view");
    document.title = "evosparse — job " + id.slice(0, 8);
    for (const card of ["ppl-card", "artifacts-card"]) $(card).hidden = true;
    $("job-error").hidden = true;
    $("job-facts").replaceChildren();
    $("job-title").textContent = "Job " + id.slice(0, 8);
    let artifactsShown = false;
    $("export-csv").onclick = () => download({ url: `v1/jobs/${encodeURIComponent(id)}/generations.csv`,
                                               name: id + "-generations.csv" });
    $("cancel-job").onclick = async () => {
      if (!confirm("Cancel this job? The search stops within one generation.")) return;
      try { await api(`v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }); } catch (err) { alert(err.message); }
    };
    poll(async () => {
      let job;
      try {
        job = await api("v1/jobs/" + encodeURIComponent(id));
      } catch (err) {
        if (err.status === 404) { $("job-title").textContent = "Job not found"; $("job-error").hidden = false;
          $("job-error").textContent = "No job " + id + " for this API key's team."; }
        throw err;
      }
      const gens = (await api(`v1/jobs/${encodeURIComponent(id)}/generations`)).items || [];
      gens.sort((a, b) => a.generation - b.generation);
      renderFacts(job);
      renderFitness(job, gens);
      renderSparsity(job, gens);
      renderReport(job);
      renderTasks(job);
      if (job.status === "SUCCEEDED" && !artifactsShown) {
        renderArtifacts(job, (await api(`v1/jobs/${encodeURIComponent(id)}/artifacts`)).items || []);
        artifactsShown = true;
      }
      return !TERMINAL.has(job.status);  // a finished job stops polling
    });
  }

  // ------------------------------ several jobs side by side

  const jobLabel = job => (job.name || job.id.slice(0, 8)).slice(0, 18);

  // The per-unit sparsity a job ended with (or has reached): the search's best vector, else the
  // latest generation's, else what the report measured per linear layer.
  function unitVector(job, gens) {
    const search = (job.report || {}).search;
    if (search && Array.isArray(search.best_vector) && search.best_vector.length) {
      return { values: search.best_vector, units: Array.isArray(search.units) ? search.units : null };
    }
    const last = gens[gens.length - 1];
    if (last && Array.isArray(last.best_vector)) return { values: last.best_vector, units: null };
    const layers = (job.report || {}).layer_sparsity;
    if (layers) return { values: Object.values(layers), units: Object.keys(layers) };
    return { values: [], units: null };
  }

  function renderCompare(jobs, gensPerJob) {
    $("compare-title").textContent = `Compare ${jobs.length} jobs`;
    const kinds = new Set(jobs.map(j => ((j.spec || {}).search || {}).fitness || "kl"));
    $("compare-fitness-note").textContent = kinds.size > 1
      ? "these jobs use different fitness measures (" + [...kinds].join(", ") + "): compare their shapes, not their values"
      : (kinds.has("ppl") ? "perplexity" : "KL divergence from dense") + " of the best candidate (lower is better)";
    EvoCharts.line($("compare-fitness"), {
      xLabel: "generation", xInteger: true, yLabel: kinds.size === 1 && kinds.has("ppl") ? "perplexity" : "fitness",
      emptyText: "none of these jobs has search generations",
      series: jobs.map((job, i) => ({ name: jobLabel(job), cls: "s-c" + (i % COMPARE_MAX),
        points: gensPerJob[i].map(g => [g.generation, g.best]) })),
    });
    const vectors = jobs.map((job, i) => unitVector(job, gensPerJob[i]));
    const n = Math.max(0, ...vectors.map(v => v.values.length));
    const named = vectors.find(v => v.units && v.units.length === n);
    const labels = named ? named.units : Array.from({ length: n }, (_, i) => "unit " + i);
    $("compare-sparsity-note").textContent = n
      ? `${n} units; bars in the order of the table` + (vectors.some(v => v.values.length !== n) ? " (jobs with fewer units leave gaps)" : "")
      : "";
    EvoCharts.bars($("compare-sparsity"), {
      labels: labels,
      shortLabels: labels.map((l, i) => { const m = /layers?\.(\d+)/.exec(l); return m ? m[1] : String(i); }),
      xLabel: "unit", yLabel: "sparsity", yFormat: v => Math.round(100 * v) + "%",
      emptyText: "no per-unit sparsity yet",
      series: jobs.map((job, i) => ({ name: jobLabel(job), cls: "s-c" + (i % COMPARE_MAX),
        values: Array.from({ length: n }, (_, k) => vectors[i].values[k]) })),
    });
    $("compare-table").tBodies[0].replaceChildren(...jobs.map((job, i) => {
      const spec = job.spec || {};
      const report = job.report || {};
      const ppl = report.perplexity || {};
      const link = h("a", { href: "#/jobs/" + encodeURIComponent(job.id) }, jobLabel(job));
      const swatch = h("span", { class: "swatch c" + (i % COMPARE_MAX) }, "■");
      return h("tr", { "data-job-id": job.id },
        h("td", {}, swatch, " ", link), h("td", {}, badge(job.status)), h("td", {}, spec.model || "–"),
        h("td", {}, (spec.pruner || "–") + " / " + (spec.allocation || "–")), h("td", { class: "num" }, pct(spec.sparsity)),
        h("td", { class: "num" }, pct(report.global_sparsity)),
        h("td", { class: "num ppl-dense" }, num(ppl.dense, 2)), h("td", { class: "num ppl-uniform" }, num(ppl.uniform, 2)),
        h("td", { class: "num ppl-pruned" }, num(ppl.pruned, 2)),
        h("td", { class: "num" }, ppl.pruned && ppl.dense ? "×" + num(ppl.pruned / ppl.dense, 2) : "–"),
        h("td", { class: "num" }, num(job.best_fitness, 4)), h("td", { class: "num" }, String(gensPerJob[i].length)));
    }));
  }

  function showCompare(ids) {
    show("compare-view");
    document.title = "evosparse — compare " + ids.length + " jobs";
    poll(async () => {
      const jobs = await Promise.all(ids.map(id => api("v1/jobs/" + encodeURIComponent(id))));
      const gens = await Promise.all(ids.map(id => api(`v1/jobs/${encodeURIComponent(id)}/generations`)
        .then(page => (page.items || []).sort((a, b) => a.generation - b.generation))));
      renderCompare(jobs, gens);
      return jobs.some(job => !TERMINAL.has(job.status));  // stop polling once all have finished
    });
  }

  // ---------------------------------------------------------------- routing and wiring

  function route() {
    if (!apiKey()) { needKey(""); return; }
    const m = /^#\/jobs\/([^/?#]+)/.exec(location.hash);
    const c = /^#\/compare\/([^/?#]+)/.exec(location.hash);
    if (m) showJob(decodeURIComponent(m[1]));
    else if (c) showCompare(decodeURIComponent(c[1]).split(",").filter(Boolean).slice(0, COMPARE_MAX));
    else showList();
  }

  $("key-form").addEventListener("submit", ev => {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORE, key);
    $("key-input").value = "";
    route();
  });
  $("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); needKey(""); });
  $("status-filter").addEventListener("change", ev => { listStatus = ev.target.value; listOffset = 0; showList(); });
  $("prev-page").addEventListener("click", () => { listOffset = Math.max(0, listOffset - PAGE); showList(); });
  $("next-page").addEventListener("click", () => { listOffset += PAGE; showList(); });
  $("compare-btn").addEventListener("click", () => {
    if (picked.size >= 2) location.hash = "#/compare/" + [...picked].map(encodeURIComponent).join(",");
  });
  let searchTimer = 0;
  $("job-search").addEventListener("input", ev => {
    clearTimeout(searchTimer);  // wait for a pause in typing: one request, not one per key
    searchTimer = setTimeout(() => { listSearch = ev.target.value.trim(); listOffset = 0; showList(); }, 300);
  });
  for (const th of document.querySelectorAll("#jobs-table th.sortable")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      // first click: the natural order for the column (newest, best first); again: reversed
      const first = key === "created_at" || key === "progress" ? "-" + key : key;
      listSort = listSort === first ? (first.startsWith("-") ? key : "-" + key) : first;
      listOffset = 0;
      showList();
    });
  }
  window.addEventListener("hashchange", route);
  route();
})();
