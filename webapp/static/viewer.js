// Shared by the single-model page (index.html) and the comparison page (compare.html). No dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
const AXES = ["axial", "coronal", "sagittal"];
const AXIS_OF = {sagittal: 0, coronal: 1, axial: 2};  // canonical RAS (X, Y, Z)
const WINDOW_LABELS = {lung: "Lung", mediastinum: "Mediastinum", bone: "Bone", xray2ct: "Full range"};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function detail(response) {
  try { const body = await response.json(); return body.detail || JSON.stringify(body); }
  catch (e) { return response.status + " " + response.statusText; }
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function figure(id, caption) {
  const fig = element("figure");
  const img = element("img", {id, alt: caption});
  img.addEventListener("load", () => { img.dataset.loaded = String(img.naturalWidth); });
  fig.append(img, element("figcaption", {}, caption));
  return fig;
}

// Window presets as radio buttons; onChange(name) when the user picks one.
function windowRadios(container, windows, current, onChange) {
  container.innerHTML = "";
  for (const w of windows) {
    const label = element("label");
    const radio = element("input", {type: "radio", name: "window", value: w});
    radio.checked = w === current;
    label.append(radio, " " + (WINDOW_LABELS[w] || w));
    container.appendChild(label);
  }
  container.onchange = (e) => onChange(e.target.value);
}

// Number inputs for a model's run-time options ({name: {label, type, min, max, step, default, help}}).
function optionInputs(container, options) {
  container.innerHTML = "";
  for (const [name, spec] of Object.entries(options || {})) {
    const label = element("label", {title: spec.help || ""}, spec.label + " ");
    const input = element("input", {type: "number", id: "opt-" + name, name, min: spec.min, max: spec.max,
                                    step: spec.step || (spec.type === "int" ? 1 : "any"), value: spec.default});
    input.style.width = "6em";
    label.appendChild(input);
    container.appendChild(label);
  }
  container.hidden = !Object.keys(options || {}).length;
}

function addOptions(form, container) {
  for (const input of container.querySelectorAll("input")) if (input.value !== "") form.append(input.name, input.value);
}

function progressText(s) {
  if (s.state === "queued") return `queued (${s.queue_position} job(s) ahead)`;
  return `${s.stage}${s.detail ? ": " + s.detail : ""} (${Math.round(100 * s.progress)}%)`;
}

// Poll a job every 500 ms; onUpdate(status) each time, until it is done or failed.
async function pollJob(jobId, onUpdate) {
  const response = await fetch("/api/jobs/" + jobId);
  if (!response.ok) return onUpdate({id: jobId, state: "failed", error: await detail(response)});
  const s = await response.json();
  onUpdate(s);
  if (s.state !== "done" && s.state !== "failed") setTimeout(() => pollJob(jobId, onUpdate), 500);
}

const fmt = (v, digits) => (v === null || v === undefined || !isFinite(v)) ? "n/a" : Number(v).toFixed(digits);

// DRR consistency as text: mean PSNR (dB) and L1 over the views, then per view; baseline beside it.
function scoreText(scores, baseline) {
  if (!scores) return "DRR consistency: n/a (the checkpoint records no DRR geometry)";
  let text = `DRR consistency PSNR ${fmt(scores.drr_psnr, 2)} dB, L1 ${fmt(scores.drr_l1, 3)}`;
  if (baseline) text += ` (mean training CT: ${fmt(baseline.drr_psnr, 2)} dB, L1 ${fmt(baseline.drr_l1, 3)})`;
  return text;
}

function scoreTable(table, scores, baseline, views) {
  table.innerHTML = "";
  const head = element("tr");
  for (const h of ["view", "PSNR (dB)", "L1", "baseline PSNR", "baseline L1"]) head.appendChild(element("th", {}, h));
  table.appendChild(head);
  if (!scores) return;
  for (const view of [...views, "mean"]) {
    const key = view === "mean" ? "" : "_" + view;
    const row = element("tr");
    row.append(element("td", {}, view), element("td", {id: "psnr-" + view}, fmt(scores["drr_psnr" + key], 2)),
               element("td", {}, fmt(scores["drr_l1" + key], 3)),
               element("td", {}, baseline ? fmt(baseline["drr_psnr" + key], 2) : "n/a"),
               element("td", {}, baseline ? fmt(baseline["drr_l1" + key], 3) : "n/a"));
    table.appendChild(row);
  }
}

function peText(pe) {
  if (!pe) return "";
  if (pe.refused) return pe.refused;
  let text = `PE probability ${fmt(pe.probability, 3)} (${pe.input}`;
  if (pe.training_prevalence !== null && pe.training_prevalence !== undefined)
    text += `; training prevalence ${fmt(pe.training_prevalence, 2)}`;
  text += pe.threshold === null || pe.threshold === undefined
    ? "; no operating threshold loaded)" : `; threshold ${fmt(pe.threshold, 3)}: ${pe.positive ? "positive" : "negative"})`;
  return text + " - a research figure, not a diagnosis";
}

// The domain gap of the inputs and the plausibility of the CT (issue 22): a line, warnings included.
function checksText(s) {
  const gap = s.domain_gap, plaus = s.plausibility;
  if (!gap && !plaus) return "";
  const warnings = [...((gap && gap.warnings) || []), ...((plaus && plaus.warnings) || [])];
  let text = gap && gap.score !== null && gap.score !== undefined ? ` | domain gap ${fmt(gap.score, 2)} (mean |z|)` : "";
  return text + (warnings.length ? ` | warnings: ${warnings.join("; ")}` : " | no plausibility warning");
}

// Slice index along `axis` of a volume (shape, spacing) at `mm` from its centre (the DRR isocentre).
function indexAt(shape, spacing, axis, mm) {
  const a = AXIS_OF[axis], n = shape[a];
  return Math.min(n - 1, Math.max(0, Math.round(mm / spacing[a] + (n - 1) / 2)));
}
