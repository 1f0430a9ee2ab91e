// aid serve's page: open an image, paint the hole, fill it on the local server, compare the results.
// Plain JavaScript, no build step and nothing from the internet. The server decodes every image and mask with the
// same loaders as `aid inpaint`; this page only paints a binary mask (white = fill) at the image's own size.
"use strict";

const $ = (id) => document.getElementById(id);
const MASK_RGB = [255, 45, 111]; // the overlay's colour; the page's opacity makes it see-through
const UNDO_DEPTH = 30; // steps, fewer on large images: the snapshots together stay under UNDO_BYTES
const UNDO_BYTES = 400e6;

const state = {
  info: null,
  image: null, // {id, width, height, preview, ...} as the server decoded it
  tool: "brush",
  drawing: false,
  last: null,
  undo: [],
  redo: [],
  busy: false,
  resultCount: 0,
  lastTiming: null, // ms from the click on Fill to the first result image shown (research/serve_timing.py reads it)
};
window.aidPage = state; // for tests and the timing script

// ---------------------------------------------------------------------------------------------- talking to the server

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error("the aid server does not answer (was it stopped?)");
  }
  const type = response.headers.get("Content-Type") || "";
  const body = type.startsWith("application/json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text || "";
}

// ---------------------------------------------------------------------------------------------------------- set-up

async function init() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    showError(e.message);
    return;
  }
  const info = state.info;
  $("version").textContent = `aid ${info.version}`;
  for (const m of info.models) {
    const option = new Option(`${m.label}${m.resolution ? ` (${m.resolution}px)` : ""}`, m.id);
    option.title = m.description;
    $("model").add(option);
    if (m.default) option.selected = true;
  }
  for (const s of info.steps) {
    const option = new Option(`${s.steps} steps (${s.nfe} NFE)`, s.steps);
    if (s.steps === info.default_steps) option.selected = true;
    $("steps").add(option);
  }
  $("samples").max = info.limits.samples;
  fillMethods();
  $("model").addEventListener("change", fillMethods);
  $("steps").addEventListener("change", updateMethodLabels);
  wireEditor();
  document.body.dataset.ready = "1";
}

function currentModel() {
  return state.info.models.find((m) => m.id === $("model").value) || state.info.models[0];
}

function fillMethods() {
  const box = $("methods");
  for (const label of [...box.querySelectorAll("label")]) label.remove();
  const preferred = currentModel().default_method;
  for (const m of state.info.methods) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.name = "method";
    input.value = m.name;
    input.checked = m.name === preferred;
    label.append(input, document.createTextNode(" "), document.createElement("span"));
    label.title = m.doc;
    box.append(label);
  }
  updateMethodLabels();
}

function updateMethodLabels() {
  const steps = $("steps").value;
  for (const label of $("methods").querySelectorAll("label")) {
    const name = label.querySelector("input").value;
    const m = state.info.methods.find((x) => x.name === name);
    const nfe = m.nfe[steps];
    label.querySelector("span").textContent = `${name}${nfe ? ` · ${nfe}` : ""}`;
    label.title = `${m.doc ? `${m.doc} ` : ""}${nfe ? `(${nfe} NFE at ${steps} steps)` : ""}`;
  }
}

// ------------------------------------------------------------------------------------------------------ the image

async function openImage(file) {
  if (!file) return;
  showError("");
  const limits = state.info.limits;
  if (file.size > limits.bytes) {
    showError(`${file.name} is too large: ${(file.size / 1e6).toFixed(1)} MB (the limit is ${limits.bytes / 1e6} MB)`);
    return;
  }
  setStatus(`opening ${file.name}…`);
  try {
    const image = await api("/api/images", { method: "POST", body: file });
    const bitmap = await loadImage(image.preview);
    state.image = image;
    const canvas = $("image-canvas"), mask = $("mask-canvas");
    canvas.width = mask.width = image.width;
    canvas.height = mask.height = image.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    state.undo = [];
    state.redo = [];
    $("editor").hidden = false;
    $("placeholder").hidden = true;
    $("compare-before").src = image.preview;
    $("image-info").textContent = `${file.name}: ${image.width}×${image.height} ${image.mode}` +
      (image.notes.length ? ` (${image.notes.join("; ")})` : "");
    $("mask-info").textContent = "";
    setStatus("paint over what to fill");
    updateRun();
    document.body.dataset.image = image.id;
  } catch (e) {
    setStatus("");
    showError(e.message);
  }
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not show ${url}`));
    img.src = url;
  });
}

// ------------------------------------------------------------------------------------------------------- painting

function wireEditor() {
  const mask = $("mask-canvas");
  mask.addEventListener("pointerdown", (e) => {
    if (!state.image || e.button !== 0) return;
    mask.setPointerCapture(e.pointerId);
    pushUndo();
    state.drawing = true;
    state.last = toImage(e);
    stroke(state.last, state.last);
  });
  mask.addEventListener("pointermove", (e) => {
    if (!state.drawing) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    for (const ev of (events.length ? events : [e])) {
      const p = toImage(ev);
      stroke(state.last, p);
      state.last = p;
    }
  });
  const end = () => {
    if (state.drawing) {
      state.drawing = false;
      updateRun();
    }
  };
  mask.addEventListener("pointerup", end);
  mask.addEventListener("pointercancel", end);

  $("tool-brush").addEventListener("click", () => setTool("brush"));
  $("tool-eraser").addEventListener("click", () => setTool("eraser"));
  $("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value; });
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("clear").addEventListener("click", () => {
    if (!state.image) return;
    pushUndo();
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    updateRun();
  });
  $("show-mask").addEventListener("change", () => mask.classList.toggle("hidden-mask", !$("show-mask").checked));
  $("image-file").addEventListener("change", (e) => { openImage(e.target.files[0]); e.target.value = ""; });
  $("mask-file").addEventListener("change", (e) => { loadMaskFile(e.target.files[0]); e.target.value = ""; });
  $("run").addEventListener("click", run);
  $("compare-slider").addEventListener("input", updateCompare);

  const zone = document.body;
  zone.addEventListener("dragover", (e) => { e.preventDefault(); $("drop-zone").classList.add("dragging"); });
  zone.addEventListener("dragleave", () => $("drop-zone").classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    $("drop-zone").classList.remove("dragging");
    if (e.dataTransfer.files.length) openImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    const key = e.key.toLowerCase();
    if ((e.ctrlKey || e.metaKey) && key === "z") { e.preventDefault(); (e.shiftKey ? redo : undo)(); }
    else if ((e.ctrlKey || e.metaKey) && key === "y") { e.preventDefault(); redo(); }
    else if (key === "b") setTool("brush");
    else if (key === "e") setTool("eraser");
    else if (key === "[" || key === "]") {
      const s = $("brush-size");
      s.value = Math.max(+s.min, Math.min(+s.max, +s.value + (key === "]" ? 4 : -4)));
      $("brush-size-value").textContent = s.value;
    }
  });
}

function setTool(tool) {
  state.tool = tool;
  $("tool-brush").classList.toggle("active", tool === "brush");
  $("tool-eraser").classList.toggle("active", tool === "eraser");
}

function toImage(e) {
  const mask = $("mask-canvas");
  const r = mask.getBoundingClientRect();
  return [(e.clientX - r.left) * mask.width / r.width, (e.clientY - r.top) * mask.height / r.height];
}

function stroke(a, b) {
  // Painted opaque, never blended: the mask is exactly what was painted (binary once exported).
  const ctx = $("mask-canvas").getContext("2d");
  ctx.save();
  ctx.globalCompositeOperation = state.tool === "eraser" ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = `rgb(${MASK_RGB.join(",")})`;
  ctx.lineWidth = +$("brush-size").value;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(a[0], a[1]);
  ctx.lineTo(b[0], b[1]);
  ctx.stroke();
  ctx.restore();
}

function snapshot() {
  const mask = $("mask-canvas");
  return mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
}

function pushUndo() {
  const mask = $("mask-canvas");
  const depth = Math.max(3, Math.min(UNDO_DEPTH, Math.floor(UNDO_BYTES / (4 * mask.width * mask.height))));
  state.undo.push(snapshot());
  while (state.undo.length > depth) state.undo.shift();
  state.redo = [];
}

function undo() {
  if (!state.undo.length) return;
  state.redo.push(snapshot());
  $("mask-canvas").getContext("2d").putImageData(state.undo.pop(), 0, 0);
  updateRun();
}

function redo() {
  if (!state.redo.length) return;
  state.undo.push(snapshot());
  $("mask-canvas").getContext("2d").putImageData(state.redo.pop(), 0, 0);
  updateRun();
}

// The hole as the server will read it: a pixel is to be filled where the painted alpha is at least half.
function holeBits() {
  const data = snapshot().data;
  const bits = new Uint8Array(data.length / 4);
  for (let i = 0; i < bits.length; i++) bits[i] = data[4 * i + 3] >= 128 ? 1 : 0;
  return bits;
}
state.holeBits = holeBits;

function maskBlob() {
  const mask = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext("2d");
  const image = ctx.createImageData(out.width, out.height);
  const bits = holeBits();
  for (let i = 0; i < bits.length; i++) {
    const v = bits[i] ? 255 : 0; // white = fill, as aid inpaint's mask files
    image.data[4 * i] = image.data[4 * i + 1] = image.data[4 * i + 2] = v;
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function loadMaskFile(file) {
  if (!file || !state.image) {
    if (!state.image) showError("open an image first, then its mask");
    return;
  }
  showError("");
  try {
    const q = `image=${state.image.id}&invert=${$("mask-invert").checked ? 1 : 0}&resize=${$("mask-resize").checked ? 1 : 0}`;
    const mask = await api(`/api/masks?${q}`, { method: "POST", body: file });
    const img = await loadImage(mask.preview);
    const tmp = document.createElement("canvas");
    tmp.width = img.width;
    tmp.height = img.height;
    tmp.getContext("2d").drawImage(img, 0, 0);
    const src = tmp.getContext("2d").getImageData(0, 0, tmp.width, tmp.height).data;
    pushUndo();
    const canvas = $("mask-canvas"), ctx = canvas.getContext("2d");
    const out = ctx.createImageData(canvas.width, canvas.height);
    for (let i = 0; i < out.data.length; i += 4) {
      if (src[i] >= 128) {
        out.data[i] = MASK_RGB[0]; out.data[i + 1] = MASK_RGB[1]; out.data[i + 2] = MASK_RGB[2]; out.data[i + 3] = 255;
      }
    }
    ctx.putImageData(out, 0, 0);
    $("mask-info").textContent = `${file.name}: ${(100 * mask.fraction).toFixed(1)}% to fill` +
      (mask.notes.length ? ` (${mask.notes.join("; ")})` : "");
    updateRun();
  } catch (e) {
    showError(e.message);
  }
}

function updateRun() {
  $("run").disabled = !state.image || state.busy;
}

// ------------------------------------------------------------------------------------------------------- filling

function chosenMethods() {
  return [...$("methods").querySelectorAll("input:checked")].map((i) => i.value);
}

function intField(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function run() {
  if (!state.image || state.busy) return;
  const t0 = performance.now();
  showError("");
  const methods = chosenMethods();
  if (!methods.length) { showError("tick at least one method"); return; }
  if (!holeBits().some((b) => b)) { showError("the mask is empty: paint over what to fill first"); return; }
  state.busy = true;
  updateRun();
  setStatus("sending the mask…");
  const jobs = [];
  try {
    const blob = await maskBlob();
    const mask = await api(`/api/masks?image=${state.image.id}`, { method: "POST", body: blob });
    for (const method of methods) {
      const request = {
        image: state.image.id, mask: mask.id, model: $("model").value, method, steps: Number($("steps").value),
        seed: intField("seed") ?? 0, samples: intField("samples") ?? 1, fit: $("fit").value,
        dilate: intField("dilate") ?? 0, feather: intField("feather") ?? 0,
      };
      const cls = intField("class");
      if (cls !== null) request.class = cls;
      jobs.push(await api("/api/fill", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
      }));
    }
    $("progress-box").hidden = false;
    let first = true;
    for (const job of jobs) {
      const done = await follow(job.id, jobs.length);
      if (done.state === "error") {
        addFailure(done);
        showError(`${done.method || "fill"}: ${done.error}`);
        continue;
      }
      for (const result of done.results) {
        const card = await addResult(result, done);
        if (first) {
          first = false;
          state.lastTiming = performance.now() - t0;
          select(card, result);
        }
      }
      if (done.notes.length) setStatus(done.notes.join("; "));
    }
    if (!first) {
      setStatus(`done: ${jobs.length} fill${jobs.length > 1 ? "s" : ""}`);
      $("status").title = `first image ${(state.lastTiming / 1000).toFixed(2)} s after the click`;
    }
  } catch (e) {
    showError(e.message);
    setStatus("");
  } finally {
    state.busy = false;
    $("progress-box").hidden = true;
    updateRun();
  }
}

function follow(jobId, count) {
  return new Promise((resolve, reject) => {
    const poll = async () => {
      try {
        const job = await api(`/api/jobs/${jobId}`);
        const progress = $("progress");
        if (job.state === "queued") {
          progress.removeAttribute("value");
          $("progress-text").textContent = `${job.method || "fill"}: waiting (${job.position} in the queue)`;
        } else {
          progress.max = Math.max(job.nfe_total, 1);
          progress.value = job.nfe_done;
          $("progress-text").textContent = `${job.method}: ${job.nfe_done} / ${job.nfe_total} NFE` +
            (count > 1 ? ` (${count} methods)` : "");
        }
        if (job.state === "done" || job.state === "error") resolve(job);
        else setTimeout(poll, 150);
      } catch (e) {
        reject(e);
      }
    };
    poll();
  });
}

async function addResult(result, job) {
  const card = document.createElement("div");
  card.className = "card";
  const img = document.createElement("img");
  img.alt = `${result.method}, seed ${result.seed}`;
  const shown = loadImage(result.url).catch(() => null);
  img.src = result.url;
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = `${result.method}${job.why ? " (default)" : ""} · seed ${result.seed} · ${result.nfe} NFE · ` +
    `${result.seconds.toFixed(2)} s`;
  label.title = result.fit;
  const link = document.createElement("a");
  link.href = `${result.url}?download=1`;
  link.download = `filled-${result.method}-seed${result.seed}.png`;
  link.textContent = "Download PNG";
  link.addEventListener("click", (e) => e.stopPropagation());
  card.append(img, label, link);
  card.dataset.result = result.id;
  card.addEventListener("click", () => select(card, result));
  $("results").prepend(card);
  $("results-box").hidden = false;
  state.resultCount += 1;
  await shown;
  return card;
}

function addFailure(job) {
  const card = document.createElement("div");
  card.className = "card failed";
  card.textContent = `${job.method || "fill"} failed: ${job.error}`;
  $("results").prepend(card);
  $("results-box").hidden = false;
}

function select(card, result) {
  for (const c of $("results").querySelectorAll(".card")) c.classList.toggle("selected", c === card);
  $("compare-after").src = result.url;
  $("compare-label").textContent = `${result.method}, seed ${result.seed}`;
  $("compare-box").hidden = false;
  updateCompare();
}

function updateCompare() {
  const v = $("compare-slider").value;
  $("compare-after").style.clipPath = `inset(0 0 0 ${v}%)`; // left of the handle: before; right: after
}

document.addEventListener("DOMContentLoaded", init);
