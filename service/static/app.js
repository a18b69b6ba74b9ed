// The demo page: POST /extract on submit (entities and their relations in one call; POST /ner when the
// server has no RE model), POST /re when two entities are chosen. No framework.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "imm-api-key";
const TOP_RELATIONS = 5;

// The tweet and picture of the last answer: /re must read the same ones, whatever is edited since.
let shown = null;
let chosen = []; // the entities picked for /re: [head] or [head, tail]
let retry = null; // what to run again once an API key is given
let extract = true; // both models are ready (from /ready): one /extract call, else /ner
let marks = []; // the highlighted entities, by their index in the answer

// --- talking to the API ---------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

async function post(path, fields) {
  const body = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    if (value !== null && value !== undefined) body.append(name, value);
  }
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method: "POST", body, headers });
  } catch (error) {
    throw new ApiError(0, `the server cannot be reached (${error.message})`);
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    // a proxy's HTML error page, say: keep the status
  }
  if (!response.ok) throw new ApiError(response.status, answer ? answer.detail : response.statusText);
  answer.serverMs = serverTime(response.headers.get("Server-Timing"));
  return answer;
}

// The "total" entry of a Server-Timing header, in milliseconds (null without one).
function serverTime(header) {
  const match = /(?:^|,)\s*total;dur=([\d.]+)/.exec(header || "");
  return match ? Number(match[1]) : null;
}

// --- errors, shown next to the field they are about ----------------------------------------

function clearErrors() {
  for (const id of ["error", "text-error", "image-error"]) $(id).textContent = "";
  $("text").removeAttribute("aria-invalid");
  $("image").removeAttribute("aria-invalid");
  $("drop").classList.remove("invalid");
}

function showError(error) {
  if (error.status === 401) {
    askForKey(sessionStorage.getItem(KEY_STORAGE) ? "That API key was refused: enter the right one." : null);
    return;
  }
  const fieldErrors = Array.isArray(error.detail) ? error.detail : [];
  const general = [];
  for (const item of fieldErrors) {
    const field = Array.isArray(item.loc) ? item.loc[item.loc.length - 1] : null;
    const message = sentence(item.msg || "invalid value");
    if (field === "text" || field === "image") {
      $(`${field}-error`).textContent = message;
      $(field).setAttribute("aria-invalid", "true");
      if (field === "image") $("drop").classList.add("invalid");
    } else {
      general.push(field ? `${field}: ${message}` : message);
    }
  }
  if (!fieldErrors.length) general.push(sentence(error.message));
  if (general.length) $("error").textContent = general.join(" ");
  $("status").textContent = "";
}

const sentence = (text) => String(text).charAt(0).toUpperCase() + String(text).slice(1);

// --- the API key ---------------------------------------------------------------------------

function askForKey(why) {
  $("key-box").hidden = false;
  if (why) $("key-why").textContent = why;
  $("status").textContent = "";
  $("key").focus();
}

function saveKey() {
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key").value = "";
  $("key-box").hidden = true;
  if (retry) retry();
}

// --- the picture ---------------------------------------------------------------------------

function pictureChanged() {
  const file = $("image").files[0] || null;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
  $("image-error").textContent = "";
  $("drop").classList.remove("invalid");
  $("image").removeAttribute("aria-invalid");
  $("file-name").textContent = file ? `${file.name} (${Math.ceil(file.size / 1024)} KB)` : "";
  $("clear-image").hidden = !file;
  if (file && file.type.startsWith("image/")) {
    preview.src = URL.createObjectURL(file);
    preview.alt = `Preview of ${file.name}`;
    preview.hidden = false;
  }
}

function clearPicture() {
  $("image").value = "";
  pictureChanged();
  $("image").focus();
}

function setupDrop() {
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) {
      $("image").files = event.dataTransfer.files;
      pictureChanged();
    }
  });
}

// --- entities ------------------------------------------------------------------------------

async function findEntities(event) {
  if (event) event.preventDefault();
  clearErrors();
  const request = { text: $("text").value, image: $("image").files[0] || null };
  retry = () => findEntities();
  setBusy(true, extract ? "Finding entities and relations…" : "Finding entities…");
  try {
    // pairs=typed: only the pairs whose types some relation joins (no "city contains person").
    const answer = await (extract ? post("/extract", { ...request, pairs: "typed" }) : post("/ner", request));
    shown = request;
    showEntities(answer);
    showRelations(answer);
  } catch (error) {
    if (error.status !== 401) $("result").hidden = true; // no stale answer under a new error
    showError(error);
  } finally {
    setBusy(false);
  }
}

const submitLabel = () => (extract ? "Find entities and relations" : "Find entities");

function setBusy(busy, message) {
  $("submit").disabled = busy;
  $("submit").textContent = busy ? "Working…" : submitLabel();
  $("result").setAttribute("aria-busy", String(busy));
  if (message) $("status").textContent = message;
}

function meta(answer) {
  const parts = [answer.image_used ? "picture used" : "no picture used"];
  if (answer.serverMs !== null) parts.push(`server time ${answer.serverMs.toFixed(1)} ms`);
  if (answer.truncated) parts.push("text truncated to the model's window");
  if (answer.models) parts.push(`models ${answer.models.ner}, ${answer.models.re}`);
  else parts.push(`model ${answer.model}`);
  // What else the server says, e.g. that a model was trained without pictures and ignored this one.
  for (const note of answer.notes || []) parts.push(note);
  return parts.join(" · ");
}

const percent = (score) => `${(score * 100).toFixed(1)} %`;

function showEntities(answer) {
  chosen = [];
  marks = [];
  $("relation").hidden = true;
  $("ner-meta").textContent = meta(answer);
  const tweet = $("tweet");
  tweet.replaceChildren();
  // Offsets count code points: index an array of them, not the UTF-16 string.
  const chars = Array.from(shown.text);
  let at = 0;
  const ordered = answer.entities.map((entity, index) => ({ entity, index }));
  for (const { entity, index } of ordered.sort((a, b) => a.entity.start - b.entity.start)) {
    if (entity.start < at) continue; // overlapping spans do not happen; never garble the text if they do
    marks[index] = entityMark(entity);
    tweet.append(chars.slice(at, entity.start).join(""), marks[index]);
    at = entity.end;
  }
  tweet.append(chars.slice(at).join(""));
  $("result").hidden = false;
  const count = answer.entities.length;
  $("hint").hidden = count < 2;
  $("result-title").textContent = count === 0 ? "No entities found" : `Entities (${count})`;
  $("status").textContent =
    count === 0 ? "No entities found." : `${count} ${count === 1 ? "entity" : "entities"} found.`;
}

function entityMark(entity) {
  const mark = document.createElement("mark");
  mark.className = "entity";
  mark.dataset.type = entity.type;
  mark.dataset.score = percent(entity.score);
  mark.tabIndex = 0;
  mark.setAttribute("role", "button");
  mark.setAttribute("aria-pressed", "false");
  mark.setAttribute("aria-label", `${entity.text}, ${entity.type}, score ${percent(entity.score)}`);
  mark.title = `${entity.type} · score ${percent(entity.score)}`;
  const label = document.createElement("span");
  label.className = "entity-type";
  label.setAttribute("aria-hidden", "true");
  label.textContent = entity.type;
  mark.append(entity.text, label);
  mark.entity = entity;
  mark.addEventListener("click", () => choose(mark));
  mark.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      choose(mark);
    }
  });
  return mark;
}

// --- relations -----------------------------------------------------------------------------

// The relations /extract found, as a list beside the tweet: "head → relation → tail (score)".
// Hovering or focusing one outlines its two entities; choosing it shows all its scores (/re).
function showRelations(answer) {
  const list = $("relation-list");
  list.replaceChildren();
  // Hidden for a /ner answer, and where there is no pair to relate.
  $("relations").hidden = !answer.relations || answer.entities.length < 2;
  if ($("relations").hidden) return;
  for (const relation of answer.relations) {
    const head = marks[relation.head];
    const tail = marks[relation.tail];
    if (!head || !tail) continue;
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "relation-item";
    const name = document.createElement("span");
    name.className = "relation-name";
    name.textContent = relation.relation;
    const score = document.createElement("span");
    score.className = "relation-score";
    score.textContent = percent(relation.score);
    button.append(`${head.entity.text} → `, name, ` → ${tail.entity.text} `, score);
    const outline = (on) => {
      head.classList.toggle("related", on);
      tail.classList.toggle("related", on);
    };
    for (const [name, on] of [["mouseenter", true], ["mouseleave", false], ["focus", true], ["blur", false]]) {
      button.addEventListener(name, () => outline(on));
    }
    button.addEventListener("click", () => {
      chosen = [];
      choose(head);
      choose(tail);
    });
    item.append(button);
    list.append(item);
  }
  const count = list.children.length;
  $("relations-empty").hidden = count > 0;
  $("relations-title").textContent = count === 0 ? "Relations" : `Relations (${count})`;
  const entities = `${answer.entities.length} ${answer.entities.length === 1 ? "entity" : "entities"}`;
  $("status").textContent = `${entities} and ${count} ${count === 1 ? "relation" : "relations"} found.`;
}

function choose(mark) {
  if (chosen.length === 2) chosen = [];
  if (chosen[0] === mark) chosen = [];
  else chosen.push(mark);
  for (const other of document.querySelectorAll("#tweet .entity")) {
    const role = chosen.indexOf(other);
    other.setAttribute("aria-pressed", String(role >= 0));
    other.classList.toggle("head", role === 0);
    other.classList.toggle("tail", role === 1);
  }
  if (chosen.length === 1) {
    $("relation").hidden = true;
    $("status").textContent = `${mark.entity.text} chosen as the first entity: choose the second.`;
  } else if (chosen.length === 2) {
    findRelation(chosen[0].entity, chosen[1].entity);
  } else {
    $("status").textContent = "Choice cleared.";
  }
}

async function findRelation(head, tail) {
  clearErrors();
  retry = () => findRelation(head, tail);
  setBusy(true, `Asking how ${head.text} relates to ${tail.text}…`);
  try {
    const answer = await post("/re", {
      text: shown.text,
      image: shown.image,
      head_start: head.start,
      head_end: head.end,
      tail_start: tail.start,
      tail_end: tail.end,
    });
    showRelation(head, tail, answer);
  } catch (error) {
    showError(error);
  } finally {
    setBusy(false);
  }
}

function showRelation(head, tail, answer) {
  const sentenceText = `${head.text} → ${answer.relation} → ${tail.text} (${percent(answer.score)})`;
  $("relation-answer").textContent = sentenceText;
  $("re-meta").textContent = meta(answer);
  const bars = $("bars");
  bars.replaceChildren();
  const ranked = Object.entries(answer.scores).sort((a, b) => b[1] - a[1]).slice(0, TOP_RELATIONS);
  for (const [relation, score] of ranked) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "bar-name";
    name.textContent = relation;
    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = percent(score);
    item.append(name, track, value);
    if (relation === answer.relation) item.classList.add("best");
    bars.append(item);
  }
  $("relation").hidden = false;
  $("status").textContent = `Relation: ${sentenceText}.`;
}

// --- start ---------------------------------------------------------------------------------

async function showModels() {
  try {
    const ready = await (await fetch("/ready")).json();
    extract = ["ner", "re"].every((task) => ready.models[task] && ready.models[task].status === "ready");
    if (!$("submit").disabled) $("submit").textContent = submitLabel();
    const names = Object.entries(ready.models)
      .map(([task, model]) => `${task.toUpperCase()}: ${model.status === "ready" ? model.name : model.status}`)
      .join(", ");
    $("models").textContent = `(${names})`;
  } catch {
    // the page works without it
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", findEntities);
  $("image").addEventListener("change", pictureChanged);
  $("clear-image").addEventListener("click", clearPicture);
  $("key-save").addEventListener("click", saveKey);
  $("key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      saveKey();
    }
  });
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) findEntities(event);
  });
  setupDrop();
  showModels();
});
