// The scdd web console: one page, no framework, no build step. Every string from the service (job fields,
// class names, error messages, spec values) is put into the page as text (textContent, text nodes,
// attribute values), never parsed as HTML. The API key lives in sessionStorage only and travels in the
// Authorization header of fetch(); images are fetched with it and shown through blob: URLs. The zip is not held
// in memory: the browser downloads it to disk from a short-lived signed link (POST .../archive-link).
"use strict";

(() => {
  const KEY = "scdd.apiKey";
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STATES = ["queued", "dispatched", "running", "succeeded", "failed", "cancelled"];
  const CURVE_METRICS = ["ce", "bn", "loss"];
  const COLOURS = { ce: "#2f6fde", bn: "#c0392b", loss: "#1e8e3e" };
  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  let leave = []; // what the current page must undo when another one is shown (timers, streams, blob URLs)

  // -- the DOM, as text only ---------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "class") el.className = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child)); // a string becomes a text node
    }
    return el;
  }

  const pct = (v) => (v === null || v === undefined ? "–" : `${Number(v).toFixed(2)} %`);
  const signed = (v) => (v === null || v === undefined ? "–" : `${v >= 0 ? "+" : ""}${Number(v).toFixed(2)}`);
  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
  const sleep = (ms, signal) => new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });

  function bar(fraction, done, id) {
    const el = h("div", { class: "bar", id }, h("div"));
    setBar(el, fraction || 0, done);
    return el;
  }

  function setBar(el, fraction, done) {
    // CSSOM, allowed by the Content-Security-Policy (no style attribute)
    el.firstChild.style.width = `${Math.round(100 * Math.max(0, Math.min(1, fraction)))}%`;
    el.dataset.fraction = String(fraction);
    el.title = el.firstChild.style.width;
    el.classList.toggle("done", Boolean(done));
  }

  // -- the API -----------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  function messageOf(body) {
    if (!body) return "";
    if (typeof body.message === "string") return body.message;
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("; ");
    }
    return "";
  }

  async function api(path, options = {}, key = sessionStorage.getItem(KEY)) {
    const headers = { ...(options.headers || {}), Authorization: `Bearer ${key}` };
    const response = await fetch(path, { ...options, headers });
    if (response.ok) return response;
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, messageOf(body) || `${response.status} ${response.statusText}`, body);
  }

  const getJSON = async (path) => (await api(path)).json();

  function handle(error, where) {
    if (error instanceof ApiError && error.status === 401) {
      signOut("The API key was refused (401): sign in again.");
      return;
    }
    if (error && error.name === "AbortError") return;
    (where || main).prepend(h("p", { class: "error", role: "alert" }, String(error.message || error)));
  }

  async function blobUrl(path) {
    const url = URL.createObjectURL(await (await api(path)).blob());
    leave.push(() => URL.revokeObjectURL(url));
    return url;
  }

  // -- sign-in -----------------------------------------------------------------------------------------
  function signOut(message) {
    sessionStorage.removeItem(KEY);
    if (location.hash !== "#/signin") location.hash = "#/signin";
    showSignIn(message);
  }

  function showSignIn(message) {
    nav.hidden = true;
    const input = h("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "scdd_…" });
    const note = h("p", { id: "signin-error", class: "error", role: "alert" }, message || "");
    const form = h("form", { class: "signin", id: "signin-form" },
      h("h1", {}, "Sign in"),
      h("label", { for: "api-key" }, "API key"), input,
      h("button", { type: "submit", class: "primary", id: "sign-in" }, "Sign in"), note,
      h("p", { class: "muted" }, "The key stays in this tab's session storage and is sent only to this service."));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) { note.textContent = "Enter an API key."; return; }
      try {
        await api("/v1/jobs?limit=1", {}, key);
      } catch (error) {
        note.textContent = error.status === 401 ? "This API key was refused." : String(error.message);
        return;
      }
      sessionStorage.setItem(KEY, key);
      location.hash = "#/jobs";
      route();
    });
    main.replaceChildren(form);
    input.focus();
  }

  // -- the jobs page -----------------------------------------------------------------------------------
  function jobRow(job) {
    const s = job.summary || {};
    return h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
      h("td", { class: `state state-${job.state}` }, job.state),
      h("td", {}, job.stage || "–"),
      h("td", {}, bar(job.progress, FINAL.has(job.state))),
      h("td", {}, when(job.created_at)),
      h("td", {}, when(job.finished_at)),
      h("td", { class: "num" }, pct(s.student_top1)),
      h("td", { class: "num" }, pct(s.baseline_top1)),
      h("td", { class: "num" }, signed(s.ior)));
  }

  function showJobs() {
    let state = sessionStorage.getItem("scdd.stateFilter") || "";
    const cursors = [null]; // the cursor of each page shown so far; the last is this page's
    let nextCursor = null;
    const select = h("select", { id: "state-filter" }, h("option", { value: "" }, "every state"),
      STATES.map((s) => h("option", { value: s }, s)));
    select.value = state;
    const body = h("tbody", { id: "jobs-body" });
    const newer = h("button", { id: "newer", type: "button" }, "◀ Newer");
    const older = h("button", { id: "older", type: "button" }, "Older ▶");
    const updated = h("span", { class: "muted", id: "updated" });
    main.replaceChildren(h("h1", {}, "Jobs"),
      h("div", { class: "toolbar" }, h("label", { for: "state-filter" }, "State"), select, newer, older, updated),
      h("table", { id: "jobs" }, h("thead", {}, h("tr", {},
        ["Job", "State", "Stage", "Progress", "Created", "Finished"].map((t) => h("th", {}, t)),
        ["Student", "Random real", "IOR"].map((t) => h("th", { class: "num" }, t)))), body));

    async function load() {
      const params = new URLSearchParams({ limit: "20" });
      if (state) params.set("state", state);
      if (cursors[cursors.length - 1]) params.set("cursor", cursors[cursors.length - 1]);
      const page = await getJSON(`/v1/jobs?${params}`);
      nextCursor = page.next_cursor;
      body.replaceChildren(...page.jobs.map(jobRow));
      if (!page.jobs.length) {
        body.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, state ? `No ${state} jobs.` : "No jobs yet.")));
      }
      newer.disabled = cursors.length <= 1;
      older.disabled = !nextCursor;
      updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    }

    const reload = () => load().catch((error) => handle(error));
    select.addEventListener("change", () => {
      state = select.value;
      sessionStorage.setItem("scdd.stateFilter", state);
      cursors.splice(1);
      reload();
    });
    newer.addEventListener("click", () => { cursors.pop(); reload(); });
    older.addEventListener("click", () => { cursors.push(nextCursor); reload(); });
    reload();
    const timer = setInterval(reload, 3000); // live: the page refreshes itself
    leave.push(() => clearInterval(timer));
  }

  // -- a job's events, from a fetch() stream (EventSource cannot send the key) ---------------------------
  async function follow(jobId, signal, onEvent, onNote) {
    let last = null;
    while (!signal.aborted) {
      try {
        const headers = last ? { "Last-Event-ID": last } : {};
        const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
        onNote("");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const frame = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const fields = {};
            for (const line of frame.split("\n")) {
              if (!line || line.startsWith(":")) continue; // a keep-alive
              const colon = line.indexOf(":");
              const name = colon < 0 ? line : line.slice(0, colon);
              let text = colon < 0 ? "" : line.slice(colon + 1);
              if (text.startsWith(" ")) text = text.slice(1);
              fields[name] = name === "data" && fields.data !== undefined ? `${fields.data}\n${text}` : text;
            }
            if (fields.id) last = fields.id;
            if (fields.data === undefined) continue;
            onEvent(fields.event || "message", JSON.parse(fields.data));
            if (fields.event === "job_finished") return;
          }
        }
        // the stream closed without job_finished: the job ended after its last events were trimmed, or the
        // connection dropped; only the second is worth resuming
        const record = await getJSON(`/v1/jobs/${encodeURIComponent(jobId)}`);
        if (FINAL.has(record.state)) { onEvent("job_finished", { status: record.state }); return; }
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && error.status === 401) { handle(error); return; }
        onNote(`event stream interrupted (${error.message}); resuming${last ? " after the last event" : ""}…`);
      }
      await sleep(2000, signal); // then resume after the last event received (Last-Event-ID)
    }
  }

  // -- the job page ------------------------------------------------------------------------------------
  function specForResubmit(spec) {
    const copy = JSON.parse(JSON.stringify(spec));
    if (copy.output) { // chosen by the service for this job; a new submission must leave them out
      delete copy.output.url;
      delete copy.output.teacher_cache;
      if (copy.output.s3 && Object.values(copy.output.s3).every((v) => v === null)) delete copy.output.s3;
      if (!Object.keys(copy.output).length) delete copy.output;
    }
    return copy;
  }

  function yamlScalar(value) {
    if (value === null || value === undefined) return "null";
    if (typeof value === "boolean") return String(value);
    if (typeof value === "number") {
      let text = String(value);
      if (/e/i.test(text)) { // YAML 1.1 (PyYAML) reads 1e-07 as a string: write 1.0e-07
        let [mantissa, exponent] = text.split(/e/i);
        if (!mantissa.includes(".")) mantissa += ".0";
        if (!/^[-+]/.test(exponent)) exponent = `+${exponent}`;
        text = `${mantissa}e${exponent}`;
      }
      return text;
    }
    return JSON.stringify(String(value)); // a double-quoted YAML scalar: every character escaped as in JSON
  }

  function toYaml(value, indent) {
    const flat = (v) => v === null || typeof v !== "object";
    if (Array.isArray(value)) {
      if (value.every(flat)) return `[${value.map(yamlScalar).join(", ")}]`;
      return value.map((item) => `\n${indent}- ${toYaml(item, `${indent}  `).trimStart()}`).join("");
    }
    if (value && typeof value === "object") {
      const keys = Object.keys(value);
      if (!keys.length) return "{}";
      return keys.map((k) => {
        const v = value[k];
        const nested = v && typeof v === "object" && !(Array.isArray(v) && v.every(flat)) &&
          (Array.isArray(v) ? v.length : Object.keys(v).length);
        return `\n${indent}${yamlScalar(k)}:${nested ? "" : " "}${toYaml(v, `${indent}  `)}`;
      }).join("");
    }
    return yamlScalar(value);
  }

  function factList(pairs) {
    return h("dl", { class: "facts" }, pairs.filter(([, v]) => v !== undefined && v !== null)
      .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function reportView(report) {
    const v = report.validate || null;
    const e = report.evaluated || null; // kind evaluate: the set judged; no teacher, no recover
    const rows = [
      ["kind", report.kind && report.kind !== "distill" ? report.kind : null],
      ["method", report.teacher ? report.method : null],
      ["dataset", `${report.dataset.name}, ${report.dataset.classes} classes`],
      ["evaluated set", e ? `${e.images} images of ${e.classes} classes from ${e.images_url}` : null],
      ["images", report.recover ? report.recover.images : null],
      ["teacher top-1", report.teacher ? pct(report.teacher.top1) : null],
      ["relabel teacher top-1", v && v.relabel_teacher && v.relabel_teacher.top1 !== undefined
        && v.relabel_teacher.top1 !== null ? pct(v.relabel_teacher.top1) : null],
      ["student top-1", v ? pct(v.student.top1) : "validation was off"],
      ["student top-5", v ? pct(v.student.top5) : null],
      ["random real top-1", v && v.baseline ? pct(v.baseline.top1) : null],
      ["IOR (student − random real)", v && v.ior !== null && v.ior !== undefined ? `${signed(v.ior)} points` : null],
    ];
    if (v && v.dd_ranking) {
      const d = v.dd_ranking;
      rows.push(["DD-Ranking IOR", signed(d.ior)], ["DD-Ranking HLR", signed(d.hlr)], ["DD-Ranking LRS", signed(d.lrs)]);
    }
    if (report.recover) {
      rows.push(["recover", `${report.recover.seconds.toFixed(1)} s, final CE ${report.recover.final_ce.toFixed(3)}, ` +
        `BN ${report.recover.final_bn.toFixed(3)}`]);
    }
    const facts = factList(rows);
    if (!v || !v.students || !v.students.length) return facts;
    // validate.students: every architecture on the same set, each beside its own random-real baseline
    const table = h("table", { class: "students", id: "students" },
      h("thead", {}, h("tr", {}, ["student", "top-1", "top-5", "random real top-1", "IOR"].map((t) => h("th", {}, t)))),
      h("tbody", {}, v.students.map((row) => h("tr", {},
        h("td", {}, row.arch),
        h("td", { class: "num" }, pct(row.top1)),
        h("td", { class: "num" }, pct(row.top5)),
        h("td", { class: "num" }, pct(row.baseline_top1)),
        h("td", { class: "num" }, signed(row.ior))))));
    return h("div", {}, facts, h("h3", {}, "Cross-architecture"), table);
  }

  const jobPath = (jobId) => `/v1/jobs/${encodeURIComponent(jobId)}`;
  const artifactUrl = (jobId, path) => `${jobPath(jobId)}/artifacts/${path.split("/").map(encodeURIComponent).join("/")}`;

  // Every page of a listing (files and, with delimiter "/", folders), 5000 entries a request.
  async function listing(jobId, query) {
    const found = { files: [], folders: [] };
    let cursor = null;
    do {
      const params = new URLSearchParams({ ...query, limit: "5000" });
      if (cursor) params.set("cursor", cursor);
      const page = await getJSON(`${jobPath(jobId)}/artifacts?${params}`);
      found.files.push(...page.files);
      found.folders.push(...(page.folders || []));
      cursor = page.next_cursor;
    } while (cursor);
    return found;
  }

  // The grid preview (at most 100 class rows, whatever the set's size) and a class browser that lists the class
  // folders only, then one class's images when it is opened: a 1000-class job is never listed or fetched whole.
  async function imagesView(jobId, container) {
    const [top, classes] = await Promise.all([listing(jobId, { delimiter: "/" }),
      listing(jobId, { prefix: "images/", delimiter: "/" })]);
    const parts = [];
    if (top.files.some((f) => f.path === "grid.png")) {
      parts.push(h("img", { class: "grid", id: "grid", alt: "grid of the distilled images",
        src: await blobUrl(artifactUrl(jobId, "grid.png")) }));
    }
    const names = classes.folders.map((folder) => folder.slice("images/".length, -1));
    const shown = h("div", { class: "class-images", id: "class-images" });
    const title = h("h3", { id: "class-title" });
    let shownUrls = []; // the open class's blob: URLs, given back when another class is opened
    let opening = 0;
    async function openClass(name) {
      const mine = ++opening;
      title.textContent = `Class ${name}: loading…`;
      const files = (await listing(jobId, { prefix: `images/${name}/` })).files;
      const images = await Promise.all(files.map(async (file) => h("img", {
        src: URL.createObjectURL(await (await api(artifactUrl(jobId, file.path))).blob()),
        alt: file.path.split("/").pop(), title: file.path })));
      const urls = images.map((img) => img.src);
      if (mine !== opening) { urls.forEach((url) => URL.revokeObjectURL(url)); return; } // another class was opened
      shownUrls.forEach((url) => URL.revokeObjectURL(url));
      shownUrls = urls;
      title.textContent = `Class ${name}: ${files.length} images`;
      shown.replaceChildren(...images);
    }
    leave.push(() => shownUrls.forEach((url) => URL.revokeObjectURL(url)));
    const buttons = names.map((name) => h("button", {
      type: "button", class: "class-button", "data-class": name,
      onclick: () => openClass(name).catch((error) => handle(error, container)),
    }, name));
    if (buttons.length) {
      const filter = h("input", { id: "class-filter", type: "search", placeholder: "filter classes" });
      filter.addEventListener("input", () => {
        const text = filter.value.trim().toLowerCase();
        buttons.forEach((b) => { b.hidden = Boolean(text) && !b.dataset.class.toLowerCase().includes(text); });
      });
      parts.push(h("p", { class: "muted" }, `${names.length} classes (click one to see its images):`), filter,
        h("div", { class: "classes", id: "classes" }, buttons), title, shown);
    }
    container.replaceChildren(...(parts.length ? parts : [h("p", { class: "muted" }, "No images yet.")]));
  }

  async function showJob(jobId) {
    const abort = new AbortController();
    leave.push(() => abort.abort());
    let job;
    try {
      job = await getJSON(`/v1/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      main.replaceChildren(h("h1", {}, `Job ${jobId}`));
      handle(error);
      return;
    }
    const stateEl = h("span", { id: "job-state" });
    const stageEl = h("span", { id: "job-stage", class: "muted" });
    const errorEl = h("p", { id: "job-error", class: "error" });
    const noteEl = h("p", { id: "stream-note", class: "muted" });
    const progress = bar(job.progress, false, "job-progress");
    const stages = h("div", { class: "stages", id: "stages" });
    const charts = h("div", { class: "charts", id: "charts" });
    const reportEl = h("div", { id: "report" }, h("p", { class: "muted" }, "When the job has succeeded."));
    const imagesEl = h("div", { id: "images" }, h("p", { class: "muted" }, "When the job has written them."));
    const cancel = h("button", { id: "cancel", type: "button", class: "danger" }, "Cancel");
    const resume = h("button", { id: "resume", type: "button", title: "Run it again on its own output, keeping what it made" }, "Resume");
    const download = h("button", { id: "download", type: "button" }, "Download all (zip)");
    const yaml = `${toYaml(specForResubmit(job.spec), "").trimStart()}\n`;
    const specEl = h("pre", { id: "spec-yaml" }, yaml);
    const copy = h("button", { id: "copy-yaml", type: "button" }, "Copy as YAML");
    main.replaceChildren(h("h1", {}, `Job ${jobId}`),
      h("div", { class: "toolbar" }, "State:", stateEl, stageEl, cancel, resume, download), errorEl,
      h("h2", {}, "Progress"), progress, noteEl, stages,
      h("h2", {}, "Curves"), charts,
      h("h2", {}, "Report"), reportEl,
      h("h2", {}, "Images"), imagesEl,
      h("h2", {}, "Spec"),
      h("div", { class: "toolbar" }, copy, h("span", { class: "muted" }, "a file `scdd submit` accepts")), specEl);

    const stageBars = new Map();
    function stageBar(stage) {
      if (!stageBars.has(stage)) {
        const el = bar(0, false, `stage-${stage}`);
        const label = h("span", { class: "muted" });
        stageBars.set(stage, { el, label });
        stages.append(h("span", {}, stage), el, label);
      }
      return stageBars.get(stage);
    }

    const plots = new Map(); // `${stage}/${loop}` (earlier attempts: `${attempt}/...`) -> {plot, data, metrics, box}
    leave.push(() => plots.forEach((p) => p.plot.destroy()));
    function chart(name, title, unit, metrics) {
      if (!plots.has(name)) {
        const box = h("div", { class: "chart", "data-curve": name, "data-points": 0 }, h("h3", {}, title));
        charts.append(box);
        const data = [[], ...metrics.map(() => [])];
        // one y scale per metric (recover's BN loss is ~100x its CE), the second one's axis on the right
        const plot = new uPlot({
          width: 380, height: 200, scales: { x: { time: false } },
          series: [{ label: unit },
            ...metrics.map((m) => ({ label: m, stroke: COLOURS[m], width: 1.5, scale: m }))],
          axes: [{ label: unit },
            ...metrics.slice(0, 2).map((m, i) => ({ scale: m, side: i ? 1 : 3, stroke: COLOURS[m],
              grid: { show: i === 0 } }))],
        }, data, box);
        plots.set(name, { plot, data, metrics, box });
      }
      return plots.get(name);
    }

    function plotPoints(name, title, unit, points) { // points: [{x, values: {ce, bn, loss, ...}}]
      const metrics = CURVE_METRICS.filter((m) => points.some((p) => typeof p.values[m] === "number"));
      if (!metrics.length) return;
      const c = chart(name, title, unit, metrics);
      for (const p of points) {
        c.data[0].push(p.x);
        c.metrics.forEach((m, i) => c.data[i + 1].push(typeof p.values[m] === "number" ? p.values[m] : null));
      }
      c.plot.setData(c.data);
      c.box.dataset.points = String(c.data[0].length);
    }

    // What GET .../curves drew: the last x of each of the current attempt's curves (events up to it are in the
    // curve, or were thinned out of it), and the attempt (an earlier attempt's events are in its own charts).
    const drawnUntil = new Map();
    let curvesAttempt = 0;
    function addPoint(event) {
      const name = `${event.stage}/${event.loop}`;
      if (typeof event.done !== "number" || (typeof event.attempt === "number" && event.attempt < curvesAttempt) ||
          event.done <= (drawnUntil.has(name) ? drawnUntil.get(name) : -Infinity)) return;
      plotPoints(name, `${event.stage} — ${event.loop}`, event.unit || "step", [{ x: event.done, values: event }]);
    }

    // The whole run's curves, downsampled by the service (the event stream keeps only the latest events); the
    // live events then add what comes after. Without the curves route (an older service: 404) the events'
    // replay draws them, as far as the stream still holds them.
    async function loadCurves() {
      let answer;
      try {
        answer = await getJSON(`${jobPath(jobId)}/curves`);
      } catch (error) {
        if (error instanceof ApiError && error.status === 404) return;
        throw error;
      }
      if (abort.signal.aborted) return;
      curvesAttempt = Math.max(job.attempt || 1, ...answer.curves.map((c) => c.attempt));
      for (const c of answer.curves) {
        const earlier = c.attempt !== curvesAttempt;
        const name = earlier ? `${c.attempt}/${c.stage}/${c.loop}` : `${c.stage}/${c.loop}`;
        plotPoints(name, `${c.stage} — ${c.loop}${earlier ? ` (attempt ${c.attempt})` : ""}`, "done", c.points);
        if (!earlier && c.points.length) drawnUntil.set(name, c.points[c.points.length - 1].x);
      }
    }

    let shownFinal = false;
    async function showResult(state) {
      if (shownFinal) return;
      shownFinal = true;
      if (state === "succeeded") {
        try {
          const report = await (await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts/report.json`)).json();
          reportEl.replaceChildren(reportView(report));
        } catch (error) { reportEl.replaceChildren(h("p", { class: "error" }, `report.json: ${error.message}`)); }
      } else {
        reportEl.replaceChildren(h("p", { class: "muted" }, `The job ${state}; no report.`));
      }
      imagesView(jobId, imagesEl).catch((error) => handle(error, imagesEl));
    }

    function update(record) {
      job = record;
      stateEl.textContent = record.state;
      stateEl.className = `state state-${record.state}`;
      stageEl.textContent = record.stage && !FINAL.has(record.state) ? `stage ${record.stage}` : "";
      errorEl.textContent = record.error || "";
      setBar(progress, record.progress, record.state === "succeeded");
      cancel.disabled = FINAL.has(record.state) || record.cancel_requested;
      resume.hidden = record.state !== "failed" && record.state !== "cancelled";
      stageEl.textContent += record.attempt > 1 ? ` (attempt ${record.attempt})` : "";
      download.disabled = record.state === "queued";
      if (FINAL.has(record.state)) showResult(record.state);
    }

    const refresh = () => getJSON(`/v1/jobs/${encodeURIComponent(jobId)}`).then(update).catch((error) => handle(error));
    update(job);
    const timer = setInterval(refresh, 5000);
    leave.push(() => clearInterval(timer));

    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        update(await (await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" })).json());
      } catch (error) { handle(error); }
    });
    resume.addEventListener("click", async () => {
      resume.disabled = true;
      try { // the next attempt: this page follows it from the start again (its history holds both)
        await api(`${jobPath(jobId)}/resume`, { method: "POST" });
        route();
      } catch (error) { resume.disabled = false; handle(error); }
    });
    download.addEventListener("click", async () => {
      try { // the browser streams the zip to disk from a signed link: nothing of it is held in this page
        const { url } = await (await api(`${jobPath(jobId)}/archive-link`, { method: "POST" })).json();
        const link = h("a", { href: url, download: `${jobId}.zip` });
        document.body.append(link);
        link.click();
        link.remove();
      } catch (error) { handle(error); }
    });
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(yaml);
        copy.textContent = "Copied";
      } catch (_) { // no clipboard (plain http beyond localhost): select the text for Ctrl-C
        getSelection().selectAllChildren(specEl);
        copy.textContent = "Selected: press Ctrl-C";
      }
    });

    loadCurves().catch((error) => handle(error)).then(() => follow(jobId, abort.signal, (kind, event) => {
      if (kind === "stage_started") stageBar(event.stage);
      else if (kind === "stage_finished") {
        const s = stageBar(event.stage);
        setBar(s.el, 1, true);
        s.label.textContent = `${event.seconds.toFixed(1)} s`;
      } else if (kind === "progress") {
        const s = stageBar(event.stage);
        setBar(s.el, event.fraction, false);
        s.label.textContent = `${event.done}/${event.total} ${event.unit}`;
        if (typeof event.job_fraction === "number" && event.job_fraction > Number(progress.dataset.fraction)) {
          setBar(progress, event.job_fraction, false);
        }
        addPoint(event);
      } else if (kind === "error") {
        errorEl.textContent = event.message || event.error || "error";
      } else if (kind === "job_finished") {
        refresh();
      }
    }, (note) => { noteEl.textContent = note; }));
  }

  // -- the submit page: a form made from the job spec's JSON Schema ------------------------------------
  function unwrap(prop) {
    if (!prop.anyOf) return { schema: prop, nullable: false };
    const options = prop.anyOf.filter((o) => o.type !== "null");
    const nullable = options.length < prop.anyOf.length;
    if (options.length === 1) return { schema: { ...options[0], description: prop.description }, nullable };
    return { schema: { type: "json", description: prop.description }, nullable };
  }

  function same(a, b) { return JSON.stringify(a) === JSON.stringify(b); }

  async function showSubmit() {
    const documentSchema = await (await fetch("/openapi.json")).json();
    const schemas = documentSchema.components.schemas;
    const resolve = (ref) => schemas[ref.split("/").pop()];
    const fields = [];
    const formError = h("p", { class: "error", id: "form-error", role: "alert" });

    function field(container, path, prop) {
      const { schema, nullable } = unwrap(prop);
      const id = `f-${path.join(".")}`;
      const fallback = prop.default !== undefined ? prop.default : null;
      let input;
      let read;
      if (schema.const !== undefined) {
        input = h("input", { id, value: String(schema.const), disabled: true });
        read = () => undefined;
      } else if (schema.enum || schema.type === "boolean") {
        const values = schema.enum || [true, false];
        input = h("select", { id }, nullable ? h("option", { value: "" }, "(none)") : null,
          values.map((v) => h("option", { value: String(v) }, String(v))));
        input.value = fallback === null ? "" : String(fallback);
        read = () => (input.value === "" ? null : values.find((v) => String(v) === input.value));
      } else if (schema.type === "integer" || schema.type === "number") {
        input = h("input", { id, type: "number", step: schema.type === "integer" ? "1" : "any", min: schema.minimum,
          max: schema.maximum, value: fallback === null ? "" : String(fallback) });
        read = () => {
          const text = input.value.trim();
          if (text === "") return null;
          return Number.isFinite(Number(text)) ? Number(text) : text; // the server names what is wrong
        };
      } else if (schema.type === "array") {
        const item = schema.items || (schema.prefixItems || [])[0] || {};
        const types = new Set(item.anyOf ? item.anyOf.map((o) => o.type) : [item.type || "string"]);
        const parse = (x) => {
          if (types.has("integer") && /^-?\d+$/.test(x)) return Number(x);
          if (types.has("number") && x !== "" && Number.isFinite(Number(x))) return Number(x);
          return x; // a string item, or what the server will name as wrong
        };
        input = h("input", { id, type: "text", placeholder: "comma-separated",
          value: Array.isArray(fallback) ? fallback.join(", ") : "" });
        read = () => {
          const text = input.value.trim();
          if (text === "") return Array.isArray(fallback) ? [] : null; // an empty list field stays a list
          return text.split(",").map((x) => parse(x.trim()));
        };
      } else if (schema.type === "object" || schema.type === "json") {
        input = h("textarea", { id, rows: 2, placeholder: "JSON" }, fallback === null ? "" : JSON.stringify(fallback));
        read = () => {
          const text = input.value.trim();
          if (text === "") return null;
          try { return JSON.parse(text); } catch (_) { return text; }
        };
      } else {
        input = h("input", { id, type: "text", value: fallback === null ? "" : String(fallback) });
        read = () => (input.value === "" ? null : input.value);
      }
      fields.push({ path, read, fallback, id });
      container.append(h("div", { class: "field" }, h("label", { for: id }, path.join(".")), input,
        h("div", { class: "help" }, prop.description || schema.description || ""),
        h("div", { class: "error", id: `${id}-error` })));
    }

    function build(container, objectSchema, path) {
      for (const [name, prop] of Object.entries(objectSchema.properties || {})) {
        const target = prop.$ref ? resolve(prop.$ref) : null;
        if (target && target.properties) {
          const set = h("fieldset", { id: `f-${[...path, name].join(".")}` });
          container.append(h("details", { open: path.length === 0 && name !== "output" },
            h("summary", {}, `${[...path, name].join(".")} — ${prop.description || target.description || ""}`), set));
          build(set, target, [...path, name]);
        } else {
          field(container, [...path, name], prop);
        }
      }
    }

    function body() {
      const spec = {};
      for (const f of fields) {
        const value = f.read();
        if (value === undefined || same(value, f.fallback)) continue; // the default: left to the server
        let node = spec;
        f.path.slice(0, -1).forEach((part) => { node = node[part] = node[part] || {}; });
        node[f.path[f.path.length - 1]] = value;
      }
      return spec;
    }

    const form = h("form", { class: "spec", id: "submit-form", novalidate: true }); // the server judges the values
    build(form, schemas.JobSpec, []);
    const preview = h("pre", { id: "submit-preview" });
    const send = h("button", { type: "submit", class: "primary", id: "submit" }, "Submit job");
    form.append(formError, send, h("h2", {}, "What will be sent"), preview);
    form.addEventListener("input", () => { preview.textContent = JSON.stringify(body(), null, 2); });
    form.addEventListener("change", () => { preview.textContent = JSON.stringify(body(), null, 2); });
    preview.textContent = JSON.stringify(body(), null, 2);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      form.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
      send.disabled = true;
      try {
        const job = await (await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body()) })).json();
        location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) { handle(error); return; }
        formError.textContent = `${error.status || ""} ${error.message}`.trim();
        if (error.body && Array.isArray(error.body.detail)) {
          for (const item of error.body.detail) {
            const path = (item.loc || []).filter((p) => p !== "body");
            let target = null; // the field, else its closest enclosing one
            for (let n = path.length; n > 0 && !target; n -= 1) {
              target = document.getElementById(`f-${path.slice(0, n).join(".")}-error`);
            }
            if (target) target.append(h("div", {}, item.msg));
          }
        }
      } finally {
        send.disabled = false;
      }
    });
    main.replaceChildren(h("h1", {}, "Submit a job"),
      h("p", { class: "muted" }, "Every field starts at its default; only the fields you change are sent."), form);
  }

  // -- routing -----------------------------------------------------------------------------------------
  function route() {
    for (const undo of leave.splice(0)) undo();
    if (!sessionStorage.getItem(KEY)) { showSignIn(); return; }
    nav.hidden = false;
    const hash = location.hash || "#/jobs";
    const job = hash.match(/^#\/jobs\/(j-[0-9a-f]{1,40})$/);
    if (job) showJob(job[1]);
    else if (hash === "#/submit") showSubmit().catch((error) => handle(error));
    else showJobs();
  }

  document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", route);
  route();
})();
