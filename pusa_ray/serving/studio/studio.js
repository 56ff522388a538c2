// The studio page: a client of the public HTTP API and nothing else (GET /v1/models for the
// tasks, defaults, limits and adapters; POST/GET/DELETE /v1/videos for jobs). No framework, no
// build step, nothing loaded from outside the service.
"use strict";

const KEY_STORAGE = "pusa-ray-api-key"; // sessionStorage: kept for this tab only
const TERMINAL = ["completed", "failed", "cancelled"];
const TASK_LABELS = {
  "t2v": "text to video",
  "i2v": "image to video",
  "start-end": "start and end frames",
  "keyframes": "keyframes",
  "extend": "extend a clip",
  "complete": "complete a clip",
  "transition": "transition between clips",
};
const NUMBER_FIELDS = [
  "frames", "height", "width", "steps", "guidance", "shift", "seed", "fps",
  "cond_frames", "end_frames", "adapter_alpha",
];
const DEFAULTED = ["frames", "height", "width", "steps", "guidance", "shift", "seed", "fps"];
const MEDIA = ["image", "end_image", "video", "end_video"];
const POLL_MS = 500;
const GALLERY_MS = 4000;

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

const studio = {
  info: null, // GET /v1/models
  media: {}, // field -> base64 data of the chosen file
  keyframes: [], // {frame, noise, data, url}
  selected: null, // the keyframe being edited
  current: null, // id of the job in the player
  poll: null,
  thumbnails: new Map(), // job id -> object URL
  urls: [], // object URLs of the player, revoked when it shows another job
};

class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

// --- the API --------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    throw new ApiError(0, `the service did not answer (${error.message})`, null);
  }
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  const error = body && body.error ? body.error : {};
  const failure = new ApiError(response.status, error.message || `${response.status} ${response.statusText}`, error.field || null);
  if (response.status === 401) askForKey(failure);
  throw failure;
}

async function getJson(path, options) {
  return (await api(path, options)).json();
}

async function blobUrl(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

// --- the API key ----------------------------------------------------------------------------

function askForKey(error) {
  // the first ask says nothing more; a key that was refused shows the API's answer
  const refused = sessionStorage.getItem(KEY_STORAGE) && error.status;
  $("#key-error").textContent = refused ? `${error.status}: ${error.message}` : "";
  $("#key-panel").hidden = false;
  $("#key-input").focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) {
    $("#key-error").textContent = "enter the key";
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("#key-panel").hidden = true;
  $("#change-key").hidden = false;
  start();
}

// --- errors next to the field they name ------------------------------------------------------

function clearErrors() {
  for (const field of $$(".field.invalid")) field.classList.remove("invalid");
  for (const text of $$(".field-error")) text.textContent = "";
  $("#form-error").textContent = "";
}

function fieldElement(name) {
  if (!name) return null;
  const parts = name.split(".");
  for (let end = parts.length; end > 0; end--) {
    const element = $(`#job-form [data-field="${parts.slice(0, end).join(".")}"]`);
    if (element && !element.hidden) return element;
  }
  return null;
}

function showError(error) {
  const element = fieldElement(error.field);
  const text = error.status ? `${error.message} (${error.status})` : error.message;
  if (element) {
    element.classList.add("invalid");
    $(".field-error", element).textContent = text;
    element.scrollIntoView({ block: "nearest" });
  } else {
    $("#form-error").textContent = text;
  }
}

// --- the model: tasks, defaults, limits, adapters --------------------------------------------

async function start() {
  let info;
  try {
    info = await getJson("/v1/models");
  } catch (error) {
    if (error.status !== 401) showError(error);
    $("#model-name").textContent = error.status === 401 ? "API key needed" : "service unavailable";
    return;
  }
  studio.info = info;
  $("#key-panel").hidden = true;
  $("#model-name").textContent = `model ${info.model.id}`;
  const task = $("#task");
  const chosen = task.value || "t2v";
  task.replaceChildren(...Object.keys(info.tasks).map((name) => new Option(TASK_LABELS[name] || name, name)));
  task.value = chosen in info.tasks ? chosen : Object.keys(info.tasks)[0];
  const defaults = info.defaults;
  for (const name of DEFAULTED) $(`#${name}`).placeholder = String(defaults[name]);
  $("#negative_prompt").placeholder = defaults.negative_prompt ? defaults.negative_prompt.slice(0, 80) : "(none)";
  $("#schedule").options[0].textContent = `default (${defaults.schedule})`;
  const limits = info.limits;
  setLimit("frames", `max ${limits.max_frames}`, limits.max_frames);
  setLimit("steps", `max ${limits.max_steps}`, limits.max_steps);
  setLimit("height", `multiple of 16; height x width <= ${limits.max_pixels}`);
  setLimit("width", "multiple of 16");
  const adapter = $("#adapter");
  const previous = adapter.value;
  adapter.replaceChildren(new Option("none (the served model)", ""), ...info.adapters.map((a) => new Option(a.id, a.id)));
  adapter.value = info.adapters.some((a) => a.id === previous) ? previous : "";
  showTaskFields();
  renderTimeline();
  refreshGallery();
}

function setLimit(name, text, max) {
  const field = $(`[data-field="${name}"]`);
  $(".limit", field).textContent = text;
  if (max !== undefined) $("input", field).max = String(max);
}

function showTaskFields() {
  if (!studio.info) return;
  const spec = studio.info.tasks[$("#task").value];
  const accepted = new Set([...spec.needs, ...spec.optional]);
  const withNoise = !["t2v", "keyframes"].includes($("#task").value);
  for (const element of $$("[data-input]")) {
    const name = element.dataset.input;
    element.hidden = name === "noise" ? !withNoise : !accepted.has(name);
  }
  for (const name of spec.needs) {
    const label = $(`[data-input="${name}"] label`);
    if (label && !label.textContent.endsWith("*")) label.textContent += " *";
  }
}

function videoFrames() {
  const value = parseInt($("#frames").value, 10);
  const fallback = studio.info ? studio.info.defaults.frames : 1;
  return Number.isFinite(value) && value > 0 ? value : fallback;
}

// --- media -----------------------------------------------------------------------------------

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function chooseMedia(name, input) {
  const field = input.closest(".field");
  const preview = $(".preview", field);
  const file = input.files[0];
  if (preview.src) URL.revokeObjectURL(preview.src);
  if (!file) {
    delete studio.media[name];
    preview.hidden = true;
    preview.removeAttribute("src");
    return;
  }
  studio.media[name] = await readBase64(file);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
}

// --- the keyframe timeline -------------------------------------------------------------------

function frameAt(clientX) {
  const box = $("#timeline").getBoundingClientRect();
  const frames = videoFrames();
  const ratio = Math.min(1, Math.max(0, (clientX - box.left) / box.width));
  return Math.round(ratio * Math.max(frames - 1, 0));
}

function placeMarker(marker, keyframe) {
  const frames = videoFrames();
  marker.style.left = `${frames > 1 ? (100 * keyframe.frame) / (frames - 1) : 0}%`;
  marker.textContent = keyframe.url ? "" : String(keyframe.frame);
  marker.title = `frame ${keyframe.frame}, noise ${keyframe.noise}`;
  marker.dataset.frame = String(keyframe.frame);
  marker.style.backgroundImage = keyframe.url ? `url("${keyframe.url}")` : "";
}

function renderTimeline() {
  const timeline = $("#timeline");
  const frames = videoFrames();
  timeline.style.setProperty("--tick", `calc(100% / ${Math.max(frames - 1, 1)})`);
  timeline.replaceChildren();
  for (const keyframe of studio.keyframes) {
    keyframe.frame = Math.min(keyframe.frame, frames - 1);
    const marker = document.createElement("button");
    marker.type = "button";
    marker.className = "keyframe";
    placeMarker(marker, keyframe);
    marker.addEventListener("pointerdown", (event) => dragKeyframe(event, keyframe, marker));
    keyframe.marker = marker;
    timeline.append(marker);
  }
  showSelected();
}

function showSelected() {
  const selected = studio.selected;
  for (const keyframe of studio.keyframes) keyframe.marker.classList.toggle("selected", keyframe === selected);
  $("#keyframe-editor").hidden = selected === null;
  if (!selected) return;
  $("#kf-frame").value = String(selected.frame);
  $("#kf-frame").max = String(videoFrames() - 1);
  $("#kf-noise").value = String(selected.noise);
  $("#kf-preview").hidden = !selected.url;
  if (selected.url) $("#kf-preview").src = selected.url;
}

function addKeyframe(event) {
  if (event.target !== $("#timeline")) return;
  const frame = frameAt(event.clientX);
  const existing = studio.keyframes.find((k) => k.frame === frame);
  studio.selected = existing || { frame, noise: 0, data: null, url: null, marker: null };
  if (!existing) studio.keyframes.push(studio.selected);
  renderTimeline();
}

function dragKeyframe(event, keyframe, marker) {
  event.preventDefault();
  studio.selected = keyframe;
  showSelected();
  marker.setPointerCapture(event.pointerId);
  const move = (moved) => {
    keyframe.frame = frameAt(moved.clientX);
    placeMarker(marker, keyframe);
    $("#kf-frame").value = String(keyframe.frame);
  };
  const end = () => {
    marker.removeEventListener("pointermove", move);
    marker.removeEventListener("pointerup", end);
    marker.removeEventListener("pointercancel", end);
    renderTimeline();
  };
  marker.addEventListener("pointermove", move);
  marker.addEventListener("pointerup", end);
  marker.addEventListener("pointercancel", end);
}

async function editKeyframe(event) {
  const keyframe = studio.selected;
  if (!keyframe) return;
  if (event.target.id === "kf-frame") {
    const value = parseInt(event.target.value, 10);
    if (Number.isFinite(value)) keyframe.frame = Math.max(0, Math.min(value, videoFrames() - 1));
  } else if (event.target.id === "kf-noise") {
    const value = parseFloat(event.target.value);
    if (Number.isFinite(value)) keyframe.noise = value;
  } else if (event.target.id === "kf-image") {
    const file = event.target.files[0];
    if (!file) return;
    if (keyframe.url) URL.revokeObjectURL(keyframe.url);
    keyframe.data = await readBase64(file);
    keyframe.url = URL.createObjectURL(file);
    event.target.value = "";
  }
  renderTimeline();
}

function removeKeyframe() {
  const keyframe = studio.selected;
  if (!keyframe) return;
  if (keyframe.url) URL.revokeObjectURL(keyframe.url);
  studio.keyframes = studio.keyframes.filter((k) => k !== keyframe);
  studio.selected = null;
  renderTimeline();
}

// --- the request -----------------------------------------------------------------------------

function visible(name) {
  const element = $(`[data-field="${name}"]`);
  return element && !element.closest("[hidden]");
}

function buildRequest() {
  const task = $("#task").value;
  const body = { task, prompt: $("#prompt").value };
  const negative = $("#negative_prompt").value;
  if (negative.trim()) body.negative_prompt = negative;
  for (const name of NUMBER_FIELDS) {
    const input = $(`#${name}`);
    if (!visible(name)) continue;
    if (input.validity.badInput) throw new ApiError(0, `${name}: is not a number`, name);
    if (input.value !== "") body[name] = Number(input.value);
  }
  if ($("#schedule").value) body.schedule = $("#schedule").value;
  if ($("#adapter").value) body.adapter = $("#adapter").value;
  if (visible("noise") && $("#noise").value.trim()) {
    const values = $("#noise").value.split(/[\s,]+/).filter(Boolean).map(Number);
    if (values.some((v) => !Number.isFinite(v))) throw new ApiError(0, "noise: give numbers between 0 and 1", "noise");
    body.noise = values;
  }
  for (const name of MEDIA) {
    if (visible(name) && studio.media[name]) body[name] = { data: studio.media[name] };
  }
  if (task === "keyframes") {
    body.keyframes = [...studio.keyframes]
      .sort((a, b) => a.frame - b.frame)
      .map((k) => ({ position: `f:${k.frame}`, noise: k.noise, ...(k.data ? { image: { data: k.data } } : {}) }));
  }
  return body;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const button = $("#submit");
  button.disabled = true;
  try {
    const body = buildRequest();
    const view = await getJson("/v1/videos", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    watch(view);
    refreshGallery();
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// --- the job in the player -------------------------------------------------------------------

function watch(view) {
  clearTimeout(studio.poll);
  for (const url of studio.urls) URL.revokeObjectURL(url);
  studio.urls = [];
  studio.current = view.id;
  $("#current").hidden = false;
  $("#current-id").textContent = view.id;
  $("#result").hidden = true;
  $("#result").removeAttribute("src");
  $("#downloads").hidden = true;
  render(view);
  if (!TERMINAL.includes(view.status)) studio.poll = setTimeout(() => poll(view.id), POLL_MS);
}

async function poll(id) {
  if (studio.current !== id) return;
  let view;
  try {
    view = await getJson(`/v1/videos/${id}`);
  } catch (error) {
    if (error.status === 404) {
      $("#current-status").textContent = "this job was deleted";
      return;
    }
    $("#current-status").textContent = `waiting for the service: ${error.message}`;
    studio.poll = setTimeout(() => poll(id), 2 * POLL_MS);
    return;
  }
  if (studio.current !== id) return;
  render(view);
  if (TERMINAL.includes(view.status)) refreshGallery();
  else studio.poll = setTimeout(() => poll(id), POLL_MS);
}

function render(view) {
  const bar = $(".progress");
  bar.setAttribute("aria-valuenow", String(view.progress));
  $("#progress-bar").style.width = `${view.progress}%`;
  const status = $("#current-status");
  status.dataset.status = view.status;
  if (view.status === "queued") {
    status.textContent = `queued: ${view.queue_reason || "waiting"}`;
  } else if (view.status === "in_progress") {
    const steps = view.steps ? `step ${view.step}/${view.steps}, ` : "";
    status.textContent = `generating: ${steps}${view.progress}%`;
  } else if (view.status === "completed") {
    const took = view.finished_at && view.started_at ? ` in ${(view.finished_at - view.started_at).toFixed(1)} s` : "";
    status.textContent = `completed${took} (attempt ${view.attempts})`;
    showResult(view);
  } else if (view.status === "failed") {
    status.textContent = `failed: ${view.error || "no reason given"}`;
  } else {
    status.textContent = view.status;
  }
}

async function showResult(view) {
  if (!view.outputs.video || $("#result").dataset.job === view.id && $("#result").src) return;
  try {
    const url = await blobUrl(view.outputs.video);
    if (studio.current !== view.id) return URL.revokeObjectURL(url);
    studio.urls.push(url);
    const player = $("#result");
    player.dataset.job = view.id;
    player.src = url;
    player.hidden = false;
    player.play().catch(() => {});
    const link = $("#download-video");
    link.href = url;
    link.download = `${view.id}.mp4`;
    $("#download-latents").onclick = (event) => download(event, view.outputs.latents, `${view.id}.safetensors`);
    $("#downloads").hidden = false;
  } catch (error) {
    $("#current-status").textContent = `completed, but the video could not be fetched: ${error.message}`;
  }
}

async function download(event, path, filename) {
  event.preventDefault();
  try {
    const url = await blobUrl(path);
    const link = Object.assign(document.createElement("a"), { href: url, download: filename });
    link.click();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    $("#current-status").textContent = `download failed: ${error.message}`;
  }
}

// --- the gallery -----------------------------------------------------------------------------

let galleryTimer = null;

async function refreshGallery() {
  clearTimeout(galleryTimer);
  let page;
  try {
    page = await getJson("/v1/videos?limit=24");
    $("#gallery-error").textContent = "";
  } catch (error) {
    if (error.status !== 401) $("#gallery-error").textContent = error.message;
    galleryTimer = setTimeout(refreshGallery, GALLERY_MS);
    return;
  }
  const list = $("#gallery");
  const shown = new Set(page.data.map((v) => v.id));
  for (const [id, url] of studio.thumbnails) {
    if (!shown.has(id)) {
      URL.revokeObjectURL(url);
      studio.thumbnails.delete(id);
    }
  }
  list.replaceChildren(...page.data.map(galleryItem));
  if (page.data.some((v) => !TERMINAL.includes(v.status))) galleryTimer = setTimeout(refreshGallery, GALLERY_MS);
}

function galleryItem(view) {
  const item = document.createElement("li");
  item.dataset.job = view.id;
  item.dataset.status = view.status;
  const image = document.createElement("img");
  image.alt = `first frame of ${view.id}`;
  item.append(image);
  if (view.outputs.thumbnail) loadThumbnail(view, image);
  const prompt = Object.assign(document.createElement("p"), { className: "prompt", textContent: view.prompt || "" });
  prompt.title = view.prompt || "";
  const status = Object.assign(document.createElement("span"), { className: `status status-${view.status}` });
  status.textContent = view.status === "in_progress" ? `${view.progress}%` : view.status;
  const meta = document.createElement("div");
  meta.append(status, ` · ${TASK_LABELS[view.task] || view.task} `);
  const open = Object.assign(document.createElement("button"), { type: "button", className: "open", textContent: "open" });
  open.addEventListener("click", () => watch(view));
  const finished = TERMINAL.includes(view.status);
  const remove = Object.assign(document.createElement("button"), {
    type: "button",
    className: finished ? "delete" : "cancel",
    textContent: finished ? "delete" : "cancel",
  });
  remove.addEventListener("click", () => deleteJob(view.id, item));
  meta.append(open, " ", remove);
  item.append(prompt, meta);
  return item;
}

async function loadThumbnail(view, image) {
  let url = studio.thumbnails.get(view.id);
  if (!url) {
    try {
      url = await blobUrl(view.outputs.thumbnail);
    } catch (_) {
      return; // the gallery still lists the job
    }
    studio.thumbnails.set(view.id, url);
  }
  image.src = url;
}

async function deleteJob(id, item) {
  try {
    await api(`/v1/videos/${id}`, { method: "DELETE" });
  } catch (error) {
    if (error.status !== 404) {
      $("#gallery-error").textContent = error.message;
      return;
    }
  }
  item.remove();
  if (studio.current === id) {
    clearTimeout(studio.poll);
    studio.current = null;
    $("#current").hidden = true;
  }
  refreshGallery();
}

// --- wiring ----------------------------------------------------------------------------------

function wire() {
  $("#key-form").addEventListener("submit", saveKey);
  $("#change-key").addEventListener("click", () => askForKey({ status: 0, message: "" }));
  $("#change-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
  $("#job-form").addEventListener("submit", submit);
  $("#task").addEventListener("change", () => {
    clearErrors();
    showTaskFields();
  });
  for (const name of MEDIA) $(`#${name}`).addEventListener("change", (event) => chooseMedia(name, event.target));
  $("#frames").addEventListener("input", renderTimeline);
  $("#timeline").addEventListener("click", addKeyframe);
  for (const id of ["kf-frame", "kf-noise", "kf-image"]) $(`#${id}`).addEventListener("change", editKeyframe);
  $("#kf-remove").addEventListener("click", removeKeyframe);
  $("#refresh").addEventListener("click", refreshGallery);
  start();
}

document.addEventListener("DOMContentLoaded", wire);
