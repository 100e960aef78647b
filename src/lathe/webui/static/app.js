// Lathe web UI: forms generated from the config schema (GET /api/meta), checked by the server
// as the CLI checks a config, and jobs that run as their own lathe processes.
"use strict";

const state = { lang: "en", meta: null, tab: "train", job: null, jobTimer: null, history: [], checkTimer: {},
                watchers: {} };
const $ = (sel) => document.querySelector(sel);
const $$ = (sel) => Array.from(document.querySelectorAll(sel));
const FORMS = ["train", "eval", "predict", "export", "quantize", "chat"];
const DATASET_KEYS = ["dataset", "eval_dataset", "calibration_dataset"];
const SOURCE_FORM = { eval: "evaluate", predict: "evaluate", export: "export", quantize: "quantize", chat: "chat" };

function w(id) { return (state.meta && state.meta.words[id]) || id; }

async function api(path, data) {
  const opts = data === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(data) };
  const r = await fetch(path, opts);
  return r.json();
}

// --- forms -----------------------------------------------------------------------------------

function fieldInput(form, f) {
  const id = `${form}-${f.key}`;
  let el;
  if (f.kind === "bool") {
    el = document.createElement("input");
    el.type = "checkbox";
    el.checked = f.value === true;
  } else if (f.kind === "select") {
    el = document.createElement("select");
    const options = f.nullable || f.default === "" ? [""].concat(f.choices) : f.choices;
    for (const c of options) {
      const o = document.createElement("option");
      o.value = c; o.textContent = c === "" ? "—" : c;
      el.appendChild(o);
    }
    el.value = f.value;
  } else {
    el = document.createElement("input");
    el.type = "text";
    el.value = f.value;
    if (f.default !== "") el.placeholder = f.default;
    if (f.suggest) {
      const list = document.createElement("datalist");
      list.id = `${id}-list`;
      for (const c of f.suggest) { const o = document.createElement("option"); o.value = c; list.appendChild(o); }
      document.body.appendChild(list);
      el.setAttribute("list", list.id);
    }
    if (f.key === "model_name_or_path") el.setAttribute("list", "model-list");
  }
  el.id = id;
  el.name = f.key;
  el.addEventListener(f.kind === "bool" || f.kind === "select" ? "change" : "input", () => {
    updateVisibility(form);
    scheduleCheck(form);
  });
  return el;
}

function renderForm(form, values) {
  const spec = state.meta.forms[form];
  const box = $(`#form-${form}`);
  box.innerHTML = "";
  for (const g of spec.groups) {
    const fs = document.createElement("fieldset");
    const legend = document.createElement("legend");
    legend.textContent = w(g.title);
    fs.appendChild(legend);
    for (const f of g.fields) {
      if (values && f.key in values) f.value = values[f.key];
      const div = document.createElement("div");
      div.className = "field";
      div.dataset.key = f.key;
      if (f.methods) div.dataset.methods = f.methods.join(" ");
      if (f.stages) div.dataset.stages = f.stages.join(" ");
      const label = document.createElement("label");
      label.htmlFor = `${form}-${f.key}`;
      label.textContent = f.label;
      const code = document.createElement("code");
      code.textContent = f.key;
      label.appendChild(code);
      div.appendChild(label);
      div.appendChild(fieldInput(form, f));
      if (f.key === "template" && form === "train") {
        const b = document.createElement("button");
        b.type = "button"; b.id = "suggest-template"; b.textContent = w("suggest_template");
        b.addEventListener("click", suggestTemplate);
        div.appendChild(b);
      }
      if (DATASET_KEYS.includes(f.key)) {  // the names dataset_info.json holds: a click adds or removes one
        const chips = document.createElement("div");
        chips.className = "chips"; chips.id = `${form}-${f.key}-chips`;
        div.appendChild(chips);
      }
      const help = document.createElement("div");
      help.className = "help"; help.textContent = f.help;
      div.appendChild(help);
      const err = document.createElement("div");
      err.className = "error"; err.id = `${form}-${f.key}-error`;
      div.appendChild(err);
      fs.appendChild(div);
    }
    box.appendChild(fs);
  }
  updateVisibility(form);
  if ($(`#${form}-dataset_dir`)) {
    $(`#${form}-dataset_dir`).addEventListener("input", () => {
      clearTimeout(state.checkTimer[`${form}-data`]);
      state.checkTimer[`${form}-data`] = setTimeout(() => refreshDatasets(form), 300);
    });
    refreshDatasets(form);
  }
}

async function refreshDatasets(form) {
  const dir = $(`#${form}-dataset_dir`).value.trim() || $(`#${form}-dataset_dir`).placeholder;
  const r = await api(`/api/datasets?dataset_dir=${encodeURIComponent(dir)}`);
  for (const key of DATASET_KEYS) {
    const box = $(`#${form}-${key}-chips`);
    if (!box) continue;
    box.innerHTML = "";
    for (const name of r.ok ? r.datasets : []) {
      const input = $(`#${form}-${key}`);
      const chosen = () => input.value.split(",").map((x) => x.trim()).filter(Boolean);
      const b = document.createElement("button");
      b.type = "button"; b.className = "chip"; b.textContent = name; b.dataset.name = name;
      b.classList.toggle("on", chosen().includes(name));
      b.addEventListener("click", () => {
        const now = chosen();
        input.value = (now.includes(name) ? now.filter((x) => x !== name) : now.concat([name])).join(", ");
        b.classList.toggle("on", input.value.split(",").map((x) => x.trim()).includes(name));
        scheduleCheck(form);
      });
      box.appendChild(b);
    }
  }
}

function readForm(form) {
  const values = {};
  for (const el of $$(`#form-${form} [name]`)) values[el.name] = el.type === "checkbox" ? el.checked : el.value;
  for (const div of $$(`#form-${form} .field`)) if (div.hidden) delete values[div.dataset.key];
  return values;
}

function updateVisibility(form) {
  const method = $(`#${form}-finetuning_type`), stage = $(`#${form}-stage`);
  for (const div of $$(`#form-${form} .field`)) {
    let show = true;
    if (div.dataset.methods && method) show = div.dataset.methods.split(" ").includes(method.value);
    if (show && div.dataset.stages && stage) show = div.dataset.stages.split(" ").includes(stage.value);
    div.hidden = !show;
  }
}

function sourceOf(form) {
  const el = $(`#source-${SOURCE_FORM[form]}`);
  return el ? el.value.trim() : "";
}

function payload(form) {
  const extra = form === "train" ? $("#train-_extra").value : "";
  return { form, values: readForm(form), extra, source: sourceOf(form) };
}

function showErrors(form, errors) {
  for (const el of $$(`[id^="${form}-"][id$="-error"]`)) el.textContent = "";
  if (SOURCE_FORM[form] && $(`#source-${SOURCE_FORM[form]}-error`)) $(`#source-${SOURCE_FORM[form]}-error`).textContent = "";
  for (const div of $$(`#tab-${tabOf(form)} .field`)) div.classList.remove("invalid");
  for (const [key, msg] of Object.entries(errors || {})) {
    let el = $(`#${form}-${key}-error`);
    if (key === "_source") el = $(`#source-${SOURCE_FORM[form]}-error`);
    if (!el) el = $(`#${form}-_form-error`);
    if (!el) continue;
    el.textContent = msg;
    const field = el.closest(".field");
    if (field) field.classList.add("invalid");
  }
}

function tabOf(form) { return form === "train" ? "train" : SOURCE_FORM[form]; }

function scheduleCheck(form) {
  localStorage.setItem(`lathe-draft-${form}`, JSON.stringify(readForm(form)));  // a reopened page keeps it
  if (form === "train") localStorage.setItem("lathe-draft-extra", $("#train-_extra").value);
  clearTimeout(state.checkTimer[form]);
  state.checkTimer[form] = setTimeout(() => checkForm(form), 250);
}

async function checkForm(form) {
  const r = await api("/api/check", payload(form));
  if (form === "train" || form === "chat") showErrors(form, r.ok ? {} : r.errors);
  else showErrors(form, r.ok ? {} : Object.fromEntries(Object.entries(r.errors).filter(([k]) => k !== "_source")));
  if (form === "train") {
    $("#train-yaml").textContent = r.ok ? r.yaml : "";
    $("#train-command").textContent = r.ok ? r.command : "";
  }
  return r.ok;
}

async function suggestTemplate() {
  const model = $("#train-model_name_or_path").value.trim();
  $("#train-note").textContent = w("waiting");
  const r = await api("/api/template", { model });
  $("#train-note").textContent = "";
  if (r.ok) { $("#train-template").value = r.template; scheduleCheck("train"); }
  else showErrors("train", r.errors);
}

// --- starting jobs ------------------------------------------------------------------------------

async function startJob(form, button) {
  button.disabled = true;
  const note = form === "train" ? $("#train-note") : null;
  if (note) note.textContent = w("waiting");
  try {
    const r = await api("/api/jobs", payload(form));
    if (!r.ok) {
      showErrors(form, r.errors);
      if (note) note.textContent = w("fix_fields");
      return;
    }
    showErrors(form, {});
    if (note) note.textContent = `${w("started")}: ${r.job.id}`;
    if (form === "train") { selectTab("runs"); openJob(r.job.id); }
    else watchJob(r.job.id, $(`#${form}-result`));
  } finally {
    button.disabled = false;
  }
}

function watchJob(id, el) {
  clearInterval(state.watchers[el.id]);
  const tick = async () => {
    const d = await api(`/api/jobs/${id}`);
    const results = Object.keys(d.results || {}).length ? JSON.stringify(d.results, null, 2) : d.log;
    el.textContent = `${d.command}\n${w("status_" + d.status)}\n\n${results}`;
    el.dataset.status = d.status;
    if (d.status !== "running") { clearInterval(state.watchers[el.id]); loadModels(); }
  };
  tick();
  state.watchers[el.id] = setInterval(tick, 1000);
}

// --- runs ---------------------------------------------------------------------------------------

async function loadJobs() {
  const r = await api("/api/jobs");
  const body = $("#jobs-table tbody");
  body.innerHTML = "";
  $("#runs-empty").hidden = r.jobs.length > 0;
  for (const j of r.jobs) {
    const tr = document.createElement("tr");
    tr.dataset.job = j.id;
    if (j.id === state.job) tr.className = "selected";
    const progress = j.max_steps ? `${j.step}/${j.max_steps}` : "";
    const cells = [j.output || j.id, j.verb, w("status_" + j.status), progress,
                   j.loss == null ? "" : j.loss.toFixed(4), j.started];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 2) td.className = `status status-${j.status}`;
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => openJob(j.id));
    body.appendChild(tr);
  }
  return r.jobs;
}

async function openJob(id) {
  state.job = id;
  clearInterval(state.jobTimer);
  const tick = async () => {
    const d = await api(`/api/jobs/${id}`);
    if (state.job !== id) return;
    $("#job-detail").hidden = false;
    $("#job-title").textContent = d.output || d.id;
    const st = $("#job-status");
    st.textContent = w("status_" + d.status);
    st.className = `status status-${d.status}`;
    st.dataset.status = d.status;
    $("#job-progress").value = d.max_steps ? d.step / d.max_steps : (d.status === "done" ? 1 : 0);
    $("#job-step").textContent = d.max_steps ? `${w("step")} ${d.step}/${d.max_steps}` : "";
    $("#job-stop").disabled = d.status !== "running";
    $("#job-command").textContent = d.command;
    const logBox = $("#job-log");
    const atEnd = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    logBox.textContent = d.log;
    if (atEnd) logBox.scrollTop = logBox.scrollHeight;  // follow the log unless the user scrolled up
    $("#job-results").textContent = Object.keys(d.results || {}).length ? JSON.stringify(d.results, null, 2) : "";
    drawChart($("#loss-chart"), d.curves);
    if (ticks++ % 5 === 0 || d.status !== "running") await loadJobs();  // the list: every 5 s
    if (d.status !== "running") clearInterval(state.jobTimer);
  };
  let ticks = 0;
  await tick();
  state.jobTimer = setInterval(tick, 1000);
}

function drawChart(box, curves) {
  const series = [["loss", "#1f77b4", w("train_loss")], ["eval_loss", "#d62728", w("eval_loss")]]
    .filter(([k]) => curves[k] && curves[k].length);
  if (!series.length) { box.innerHTML = ""; return; }
  const W = 560, H = 240, L = 54, R = 12, T = 14, B = 30;
  const pts = series.flatMap(([k]) => curves[k]);
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => T + (y1 - y) / (y1 - y0) * (H - T - B);
  let svg = `<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" xmlns="http://www.w3.org/2000/svg">`;
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#888"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#888"/>`;
  svg += `<text x="${L - 4}" y="${T + 8}" font-size="11" text-anchor="end">${y1.toFixed(3)}</text>`;
  svg += `<text x="${L - 4}" y="${H - B}" font-size="11" text-anchor="end">${y0.toFixed(3)}</text>`;
  svg += `<text x="${L}" y="${H - 10}" font-size="11">${x0}</text><text x="${W - R}" y="${H - 10}" font-size="11" text-anchor="end">${w("step")} ${x1}</text>`;
  series.forEach(([k, color, name], i) => {
    const line = curves[k].map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg += `<polyline class="curve-${k}" fill="none" stroke="${color}" stroke-width="2" points="${line}"/>`;
    for (const p of curves[k]) svg += `<circle cx="${sx(p[0]).toFixed(1)}" cy="${sy(p[1]).toFixed(1)}" r="2" fill="${color}"/>`;
    svg += `<text x="${W - R - 4}" y="${T + 12 + i * 14}" font-size="12" text-anchor="end" fill="${color}">${name}</text>`;
  });
  box.innerHTML = svg + "</svg>";
}

// --- data preview --------------------------------------------------------------------------------

async function previewData() {
  const out = $("#preview-out");
  out.textContent = w("waiting");
  const r = await api("/api/preview", payload("train"));
  out.innerHTML = "";
  if (!r.ok) { showErrors("train", r.errors); return; }
  const rep = r.report;
  const h = document.createElement("h4");
  h.textContent = `${w("preview_help")} (${rep.rows} ${w("rows")})`;
  out.appendChild(h);
  for (const ex of rep.examples) {
    const div = document.createElement("div");
    div.className = "example";
    for (const [text, trained] of ex.segments) {
      const span = document.createElement("span");
      span.className = trained ? "trained" : "prompt";
      span.textContent = text;
      div.appendChild(span);
    }
    out.appendChild(div);
  }
  const t = document.createElement("table");
  t.className = "stats";
  const L = rep.lengths;
  t.innerHTML = `<tr><th>${w("length_stats")}</th><th>${w("stat_mean")}</th><th>${w("stat_p50")}</th><th>${w("stat_p95")}</th><th>${w("stat_max")}</th></tr>`;
  for (const k of ["prompt", "response", "total"]) {
    const s = L[k];
    const tr = document.createElement("tr");
    for (const v of [k, s.mean, s.median, s.p95, s.max]) { const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
    t.appendChild(tr);
  }
  out.appendChild(t);
  const p = document.createElement("div");
  p.className = "note";
  p.textContent = `${w("truncated")}: ${rep.truncation.truncated_rows ?? 0} · ${w("padding")}: ${(rep.padding.without_packing * 100).toFixed(1)}%`;
  out.appendChild(p);
  for (const warn of rep.warnings || []) { const d = document.createElement("div"); d.className = "error"; d.textContent = warn; out.appendChild(d); }
}

// --- chat ----------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("b");
  who.textContent = role === "user" ? w("you") : w("assistant");
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("#chat-log").appendChild(div);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return body;
}

async function loadChat() {
  $("#chat-loaded").textContent = w("waiting");
  const r = await api("/api/chat/load", { ...payload("chat") });
  if (!r.ok) { $("#chat-loaded").textContent = ""; showErrors("chat", r.errors); return; }
  showErrors("chat", {});
  $("#chat-loaded").textContent = `${w("loaded")}: ${sourceOf("chat")} (${r.template})`;
  if (!$("#chat-system").value && r.system) $("#chat-system").value = r.system;
}

async function sendChat() {
  const message = $("#chat-input").value.trim();
  if (!message) return;
  $("#chat-send").disabled = true;
  showErrors("chat", {});
  addMessage("user", message);
  const body = addMessage("assistant", "");
  $("#chat-input").value = "";
  let text = "";
  try {
    const r = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...payload("chat"), message, system: $("#chat-system").value, history: state.history }) });
    if (!r.headers.get("content-type").includes("ndjson")) {
      const e = await r.json();
      body.parentElement.remove();
      showErrors("chat", e.errors);
      return;
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const item = JSON.parse(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (item.text) { text += item.text; body.textContent = text; }
        if (item.error) showErrors("chat", { _form: item.error });
        if (item.done) body.parentElement.dataset.done = "1";
      }
    }
    state.history.push([message, text]);
  } finally {
    $("#chat-send").disabled = false;
  }
}

// --- sources, models, configs -----------------------------------------------------------------------

function renderSources() {
  for (const box of $$(".source")) {
    const tab = box.closest(".tab").id.slice(4);
    const value = $(`#source-${tab}`) ? $(`#source-${tab}`).value : "";
    box.innerHTML = "";
    box.className = "source field wide";
    const label = document.createElement("label");
    label.htmlFor = `source-${tab}`;
    label.textContent = w("source_model");
    const input = document.createElement("input");
    input.id = `source-${tab}`;
    input.setAttribute("list", "model-list");
    input.value = value;
    input.addEventListener("input", () => { for (const f of box.dataset.form.split(" ")) scheduleCheck(f); });
    const help = document.createElement("div");
    help.className = "help"; help.textContent = w("source_help");
    const err = document.createElement("div");
    err.className = "error"; err.id = `source-${tab}-error`;
    box.append(label, input, help, err);
  }
}

async function loadModels() {
  const r = await api("/api/models");
  const list = $("#model-list");
  list.innerHTML = "";
  for (const m of r.models) { const o = document.createElement("option"); o.value = m; list.appendChild(o); }
}

async function loadConfigs() {
  const r = await api("/api/configs");
  const sel = $("#config-list");
  sel.innerHTML = "";
  for (const c of r.configs) { const o = document.createElement("option"); o.value = c; o.textContent = c; sel.appendChild(o); }
}

async function saveConfig() {
  const r = await api("/api/configs", { ...payload("train"), name: $("#config-name").value.trim() });
  if (!r.ok) { showErrors("train", r.errors); return; }
  showErrors("train", {});
  $("#train-note").textContent = `${w("saved")}: ${r.path}`;
  loadConfigs();
}

async function loadConfig() {
  const name = $("#config-list").value;
  if (!name) return;
  const r = await api(`/api/configs/${encodeURIComponent(name)}`);
  if (!r.ok) { showErrors("train", r.errors); return; }
  const start = Object.fromEntries(state.meta.forms.train.groups.flatMap((g) => g.fields).map((f) => [f.key, f.default]));
  renderForm("train", { ...start, ...r.values });
  $("#train-_extra").value = r.extra || "";
  $("#config-name").value = name;
  scheduleCheck("train");
}

// --- language and tabs ----------------------------------------------------------------------------

function draft(form) {
  try { return JSON.parse(localStorage.getItem(`lathe-draft-${form}`)) || undefined; } catch (e) { return undefined; }
}

async function setLang(lang) {
  const kept = Object.fromEntries(FORMS.map((f) => [f, state.meta ? readForm(f) : draft(f)]));
  state.meta = await api(`/api/meta?lang=${lang}`);
  state.lang = lang;
  localStorage.setItem("lathe-lang", lang);
  const url = new URL(location.href);
  url.searchParams.set("lang", lang);
  history.replaceState(null, "", url);
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.title = w("title");
  $("#title").textContent = w("title");
  $("#lang-toggle").textContent = w("language");
  for (const el of $$("[data-word]")) el.textContent = w(el.dataset.word);
  renderSources();
  for (const f of FORMS) renderForm(f, kept[f]);
  checkForm("train");
  if (state.job) openJob(state.job);
  else loadJobs();
}

function selectTab(tab) {
  state.tab = tab;
  for (const b of $$("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const s of $$(".tab")) s.classList.toggle("active", s.id === `tab-${tab}`);
  if (tab === "runs") loadJobs();
  location.hash = tab;
}

async function init() {
  const asked = new URL(location.href).searchParams.get("lang");
  await setLang(asked || localStorage.getItem("lathe-lang") || "en");
  $("#train-_extra").value = localStorage.getItem("lathe-draft-extra") || "";
  for (const b of $$("#tabs button")) b.addEventListener("click", () => selectTab(b.dataset.tab));
  $("#lang-toggle").addEventListener("click", () => setLang(state.lang === "en" ? "zh" : "en"));
  $("#train-_extra").addEventListener("input", () => scheduleCheck("train"));
  $("#train-start").addEventListener("click", (e) => startJob("train", e.target));
  $("#train-preview").addEventListener("click", previewData);
  $("#config-save").addEventListener("click", saveConfig);
  $("#config-load").addEventListener("click", loadConfig);
  $("#runs-refresh").addEventListener("click", loadJobs);
  $("#job-stop").addEventListener("click", async () => { await api(`/api/jobs/${state.job}/stop`, {}); openJob(state.job); });
  for (const f of ["eval", "predict", "export", "quantize"]) $(`#${f}-start`).addEventListener("click", (e) => startJob(f, e.target));
  $("#chat-load").addEventListener("click", loadChat);
  $("#chat-send").addEventListener("click", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); } });
  $("#chat-clear").addEventListener("click", () => { state.history = []; $("#chat-log").innerHTML = ""; });
  await Promise.all([loadModels(), loadConfigs()]);
  const jobs = await loadJobs();
  const running = jobs.find((j) => j.status === "running" && j.verb === "train");
  const tab = location.hash.slice(1);  // a page reopened while a run trains shows that run
  selectTab(["train", "runs", "evaluate", "chat", "export", "quantize"].includes(tab) ? tab : running ? "runs" : "train");
  if (running) await openJob(running.id);
  document.body.dataset.ready = "1";
}

init();
