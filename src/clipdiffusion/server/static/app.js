// The clipdiffusion page: live token report per chunk (and per schedule text: [from:to:when], [a|b], AND parts,
// <lora:...> tags with their status), generation with progress and interrupt, per-token cross-attention heatmaps.
// Plain DOM, no build step; talks to /api/* and /sdapi/v1/* on the same origin.
"use strict";

const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(errorText(response.status, data));
  return data;
}

function errorText(status, data) {
  if (Array.isArray(data.detail)) return data.detail.map((d) => d.msg).join("; ");
  return `${status}: ${data.detail || data.errors || "request failed"}`;
}

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === chosen)));
}

// ---- token report ----------------------------------------------------------------------------------------

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

const serials = {prompt: 0, negative: 0};  // only the latest answer per field is drawn

async function updateTokens(which) {
  const text = $(which === "prompt" ? "prompt" : "negative").value;
  const counter = $(`${which}-counter`);
  const box = $(`${which}-tokens`);
  const serial = ++serials[which];
  try {
    const steps = Math.max(1, Number($("steps").value) || 20);
    const report = await api("/api/tokenize", {prompt: text, long_prompt: $("long_prompt").value, steps,
                                               negative: which === "negative"});
    if (serial !== serials[which]) return;
    counter.textContent = report.summary || "0/75";
    counter.classList.toggle("dropping", report.dropped_tokens > 0);
    const several = (report.texts || []).length > 1;
    counter.title = report.dropped_tokens > 0
      ? `${report.dropped_tokens} tokens dropped: ${report.dropped_text}`
      : several ? "tokens per chunk of the schedule text with the most tokens" : "tokens per chunk";
    renderTokens(box, report.tokens);
    renderSchedule($(`${which}-schedule`), report);
    $(`${which}-notes`).textContent = (report.notes || []).join(" ");
  } catch (err) {
    counter.textContent = "?";
    counter.title = err.message;
  }
}

// The schedule's texts with their step ranges and counts (consecutive steps with the same text joined), the AND
// parts with their weights, and the extra-network tags with what happens to them. Nothing for a plain prompt.
function renderSchedule(box, report) {
  const nodes = [];
  const texts = report.texts || [];
  const parts = report.parts || [];
  if (texts.length > 1 || parts.length > 1) {
    const table = document.createElement("table");
    parts.forEach((part, p) => {
      if (parts.length > 1) addRow(table, [`AND part ${p + 1}`, `weight ${part.weight}`, ""], "");
      const ranges = [];
      for (const e of report.schedule) {
        if (e.part !== p) continue;
        const last = ranges[ranges.length - 1];
        if (last && last.text_index === e.text_index) last.end = e.end;
        else ranges.push({start: e.start, end: e.end, text_index: e.text_index});
      }
      for (const r of ranges.slice(0, 60)) {
        const t = texts[r.text_index];
        const steps = r.start === r.end ? `step ${r.start}` : `steps ${r.start}–${r.end}`;
        addRow(table, [steps, t.summary, t.text], r.text_index === report.headline ? "headline" : "");
      }
      if (ranges.length > 60) addRow(table, ["…", `${ranges.length - 60} more step ranges`, ""], "");
    });
    nodes.push(table);
  }
  for (const n of report.networks || []) {
    const div = document.createElement("div");
    div.className = "tag";
    const weights = n.te === null ? "" : ` te ${n.te}, unet ${n.unet}${n.dyn === null ? "" : `, dyn ${n.dyn}`}`;
    div.textContent = `${n.text}: ${n.kind} "${n.name}"${weights} (${n.status})`;
    nodes.push(div);
  }
  box.replaceChildren(...nodes);
}

function addRow(table, cells, className) {
  const row = table.insertRow();
  row.className = className;
  ["steps", "count", "text"].forEach((name, i) => {
    const cell = row.insertCell();
    cell.className = name;
    cell.textContent = cells[i];
  });
}

function renderTokens(box, tokens) {
  const parts = [];
  let previous = null;
  for (const t of tokens) {
    if (t.break) {
      const span = document.createElement("span");
      span.className = "tok break";
      span.textContent = "BREAK";
      parts.push(span);
      continue;
    }
    if (previous !== null && t.chunk !== null && t.chunk !== previous) {
      const bar = document.createElement("span");
      bar.className = "boundary";
      bar.title = `chunk ${t.chunk + 1} starts here`;
      parts.push(bar);
    }
    const span = document.createElement("span");
    span.className = t.chunk === null ? "tok dropped" : `tok c${t.chunk % 2}`;
    span.textContent = t.text;
    span.title = t.chunk === null ? "dropped by this long-prompt strategy"
      : `chunk ${t.chunk + 1}, weight ${t.weight}`;
    parts.push(span);
    if (t.chunk !== null) previous = t.chunk;
  }
  box.replaceChildren(...parts);
}

// ---- generation ------------------------------------------------------------------------------------------

let polling = null;

function setBusy(busy) {
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  if (busy) {
    $("progress").value = 0;
    polling = setInterval(pollProgress, 300);
  } else {
    clearInterval(polling);
    polling = null;
  }
}

async function pollProgress() {
  try {
    const p = await api("/sdapi/v1/progress");
    $("progress").value = p.progress;
    if (p.state.sampling_steps) $("status").textContent = `step ${p.state.sampling_step}/${p.state.sampling_steps}`;
  } catch (err) { /* the next poll will tell */ }
}

function request() {
  const number = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value, negative_prompt: $("negative").value, model: $("model").value,
    long_prompt: $("long_prompt").value, weighting: $("weighting").value, clip_skip: $("clip_skip").value === "" ? null : number("clip_skip"),
    sampler: $("sampler").value, schedule: $("schedule").value, steps: number("steps"),
    guidance: number("guidance"), seed: number("seed"), width: number("width"), height: number("height"),
    attention_maps: $("attention_maps").checked, speed: $("speed").value,
  };
}

async function generate() {
  const status = $("status");
  status.classList.remove("error");
  status.textContent = "queued";
  setBusy(true);
  try {
    const result = await api("/api/generate", request());
    $("progress").value = 1;
    showImage(result.images[0]);
    showAttention(result.attention);
    $("parameters").value = result.infotexts[0] || "";
    status.textContent = result.interrupted ? "interrupted" : `done, seed ${result.seeds[0]}`;
  } catch (err) {
    status.textContent = err.message;
    status.classList.add("error");
  } finally {
    setBusy(false);
  }
}

function showImage(b64) {
  const img = $("result-image");
  img.src = `data:image/png;base64,${b64}`;
  img.hidden = false;
  $("overlay").hidden = true;
}

function showAttention(attention) {
  const strip = $("attention-strip");
  strip.replaceChildren();
  $("strip-title").hidden = !attention || attention.maps.length === 0;
  if (!attention) return;
  attention.maps.forEach((b64, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "heat";
    button.title = `where "${attention.tokens[i]}" attended`;
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.alt = attention.tokens[i];
    const label = document.createElement("span");
    label.textContent = attention.tokens[i];
    button.append(img, label);
    button.addEventListener("click", () => selectHeatmap(button, b64));
    strip.append(button);
  });
}

function selectHeatmap(button, b64) {
  const overlay = $("overlay");
  const already = button.classList.contains("selected");
  document.querySelectorAll(".heat.selected").forEach((b) => b.classList.remove("selected"));
  overlay.hidden = already;
  if (!already) {
    button.classList.add("selected");
    overlay.src = `data:image/png;base64,${b64}`;
  }
}

// ---- wiring ----------------------------------------------------------------------------------------------

async function init() {
  try {
    const info = await api("/api/info");
    fillSelect($("model"), info.models, info.options.sd_model_checkpoint);
    fillSelect($("long_prompt"), info.long_prompt, "chunk");
    fillSelect($("weighting"), info.weighting, "a1111");
    fillSelect($("sampler"), info.samplers, "euler");
    fillSelect($("schedule"), info.schedules, "normal");
    $("steps").max = info.limits.max_steps;
    $("width").max = info.limits.max_width;
    $("height").max = info.limits.max_height;
  } catch (err) {
    $("status").textContent = err.message;
  }
  const prompt = debounce(() => updateTokens("prompt"), 200);
  const negative = debounce(() => updateTokens("negative"), 200);
  $("prompt").addEventListener("input", prompt);
  $("negative").addEventListener("input", negative);
  $("long_prompt").addEventListener("change", () => { updateTokens("prompt"); updateTokens("negative"); });
  $("steps").addEventListener("input", debounce(() => { updateTokens("prompt"); updateTokens("negative"); }, 200));
  $("generate").addEventListener("click", generate);
  $("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch(() => {}));
  $("copy").addEventListener("click", () => {
    $("parameters").select();
    (navigator.clipboard ? navigator.clipboard.writeText($("parameters").value) : Promise.reject())
      .catch(() => document.execCommand("copy"));
  });
  updateTokens("prompt");
}

document.addEventListener("DOMContentLoaded", init);
