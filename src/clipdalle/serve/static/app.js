// The clipdalle page: plain browser JavaScript (no build step, nothing fetched from the internet) over the JSON
// API that /docs describes. Every request goes through `api()`, which adds the API key when the server wants one
// and turns the server's {"detail": "..."} answers into errors shown next to the form that caused them.
"use strict";

const KEY_STORAGE = "clipdalle-api-key";
const TABS = ["search", "classify", "describe", "duplicates", "generate", "edit"];
const RESULTS_PER_SEARCH = 24; // fills rows of 2, 3, 4, 6 and 8 columns evenly
const SMALL_IMAGE = 128; // images narrower than this are scaled up with crisp pixels instead of blur

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  info: null,
  classifyFile: null,
  editFile: null,
  editImage: null, // HTMLImageElement of the uploaded image, for the canvas
  editBox: null, // [x0, y0, x1, y1] in pixels of the uploaded image, end exclusive
  heatQuery: null, // the query the shown results answer, for their heat maps (null: an uploaded image)
  describeFile: null,
};

const element = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------------------- API access

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// The server answers {"detail": "one line"}; FastAPI's own validation answers a list; the OpenAI routes {"error"}.
function detailMessage(body, status) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail
      .map((problem) => [(problem.loc || []).slice(1).join("."), problem.msg].filter(Boolean).join(": "))
      .join("; ");
  }
  if (body && body.error && body.error.message) return body.error.message;
  return `The server answered with status ${status}.`;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch {
    throw new ApiError("Cannot reach the server. Is it still running?", 0);
  }
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: keep the status line
  }
  const message = detailMessage(body, response.status);
  if (response.status === 401) {
    showAuth(
      state.key
        ? "That API key was not accepted. Try again."
        : "This server is protected: enter the API key it was started with (--api-key).",
    );
  }
  throw new ApiError(message, response.status);
}

async function apiJson(path, options) {
  const response = await api(path, options);
  return response.json();
}

// <img src> cannot send an Authorization header, so with a key the bytes are fetched and shown from a blob URL.
async function showImage(img, url) {
  img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < SMALL_IMAGE), {
    once: true,
  });
  if (!state.key) {
    img.src = url;
    return;
  }
  try {
    const blob = await (await api(url)).blob();
    const objectUrl = URL.createObjectURL(blob);
    img.addEventListener("load", () => URL.revokeObjectURL(objectUrl), { once: true });
    img.src = objectUrl;
  } catch (error) {
    img.alt = `Could not load the image: ${error.message}`;
  }
}

// ------------------------------------------------------------------------------------------------- helpers

function make(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function formatBytes(bytes) {
  if (bytes >= 1 << 20) return `${(bytes / (1 << 20)).toFixed(1)} MB`;
  return `${Math.ceil(bytes / 1024)} kB`;
}

function checkUpload(file) {
  if (!file.type.startsWith("image/"))
    throw new ApiError(`${file.name} is not an image (type ${file.type || "unknown"}).`, 0);
  const limit = state.info && state.info.limits ? state.info.limits.max_upload_bytes : null;
  if (limit && file.size > limit) {
    throw new ApiError(
      `${file.name} is ${formatBytes(file.size)}; this server accepts up to ${formatBytes(limit)}.`,
      0,
    );
  }
}

// Runs one request for a panel: clears its error, shows its spinner, disables its buttons, shows what went wrong.
async function runTask(panel, task) {
  const error = element(`${panel}-error`);
  const busy = element(`${panel}-busy`);
  const results = element(`${panel}-results`);
  const buttons = element(`panel-${panel}`).querySelectorAll("button[type=submit]");
  error.hidden = true;
  busy.hidden = false;
  results.setAttribute("aria-busy", "true");
  buttons.forEach((button) => (button.disabled = true));
  try {
    await task();
  } catch (problem) {
    error.textContent = problem.message || String(problem);
    error.hidden = false;
    results.replaceChildren(); // results of an earlier request would look like answers to this one
  } finally {
    busy.hidden = true;
    results.removeAttribute("aria-busy");
    buttons.forEach((button) => (button.disabled = false));
  }
}

function showError(panel, message) {
  const error = element(`${panel}-error`);
  error.textContent = message;
  error.hidden = false;
}

function wireDropzone(zone, input, panel, onFile) {
  const accept = (file) => {
    try {
      checkUpload(file);
    } catch (problem) {
      showError(panel, problem.message);
      return;
    }
    element(`${panel}-error`).hidden = true;
    onFile(file);
  };
  input.addEventListener("change", () => {
    if (input.files.length) accept(input.files[0]);
    input.value = ""; // picking the same file again still fires "change"
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = [...event.dataTransfer.files].find((candidate) => candidate.type.startsWith("image/"));
    if (file) accept(file);
    else showError(panel, "Drop an image file (PNG, JPEG, WebP, …).");
  });
}

// ------------------------------------------------------------------------------------------------- tabs

function selectTab(name, focus = false) {
  if (!TABS.includes(name)) name = "search";
  for (const tab of TABS) {
    const button = element(`tab-${tab}`);
    const selected = tab === name;
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    element(`panel-${tab}`).hidden = !selected;
    if (selected && focus) button.focus();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function wireTabs() {
  for (const tab of TABS) {
    const button = element(`tab-${tab}`);
    button.addEventListener("click", () => selectTab(tab));
    // Arrow keys move between tabs, as the WAI-ARIA tabs pattern expects.
    button.addEventListener("keydown", (event) => {
      const index = TABS.indexOf(tab);
      const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: TABS.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      selectTab(TABS[(moves[event.key] + TABS.length) % TABS.length], true);
    });
  }
  window.addEventListener("hashchange", () => selectTab(location.hash.slice(1)));
  selectTab(location.hash.slice(1) || "search");
}

// ------------------------------------------------------------------------------------------------- server info

function showAuth(message) {
  element("auth-message").textContent = message;
  element("auth-form").hidden = false;
  element("api-key").focus();
}

function wireAuth() {
  element("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = element("api-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    loadInfo();
  });
}

async function loadInfo() {
  const status = element("status");
  let info;
  try {
    info = await apiJson("/api/info");
  } catch (problem) {
    status.textContent = problem.status === 401 ? "Locked: enter the API key" : problem.message;
    status.className = "status problem";
    return;
  }
  element("auth-form").hidden = true;
  state.info = info;
  applyInfo(info);
}

function applyInfo(info) {
  const chip = (text, on, title) => make("span", { className: `chip ${on ? "on" : "off"}`, text, title });
  const count = `${info.images.toLocaleString()} image${info.images === 1 ? "" : "s"}`;
  const status = element("status");
  status.className = "status";
  status.replaceChildren(
    chip(count, info.search, info.search ? "Images in the search index" : "No index loaded"),
    chip("CLIP", info.clip, info.clip ? "CLIP is loaded: search and zero-shot work" : "No CLIP model loaded"),
    chip("DALL·E", info.dalle, info.dalle ? "DALL·E is loaded: generate and edit work" : "No DALL·E model loaded"),
  );
  const available = { search: info.search && info.clip, clip: info.clip, dalle: info.dalle };
  for (const notice of document.querySelectorAll("[data-requires]")) {
    const on = available[notice.dataset.requires];
    notice.hidden = on;
    const panel = notice.closest(".panel");
    for (const control of panel.querySelectorAll("input, textarea, button, select")) control.disabled = !on;
    panel.querySelectorAll(".dropzone").forEach((zone) => zone.classList.toggle("disabled", !on));
    element(panel.getAttribute("aria-labelledby")).classList.toggle("off", !on);
  }
  const limits = info.limits || {};
  for (const id of ["generate-n", "edit-n"]) if (limits.max_n) element(id).max = limits.max_n;
  for (const id of ["generate-keep", "edit-keep"]) if (limits.max_keep) element(id).max = limits.max_keep;
  for (const id of ["generate-prompt", "edit-prompt", "search-input", "describe-query"]) {
    if (limits.max_prompt_chars) element(id).maxLength = limits.max_prompt_chars;
  }
}

// ------------------------------------------------------------------------------------------------- search

function searchCount() {
  const limit = state.info && state.info.limits ? state.info.limits.max_k : RESULTS_PER_SEARCH;
  return Math.min(RESULTS_PER_SEARCH, limit || RESULTS_PER_SEARCH);
}

function showQuery(children) {
  const bar = element("search-query");
  bar.replaceChildren(...children);
  bar.hidden = false;
}

function renderSearchResults(results) {
  const grid = element("search-results");
  element("search-hint").hidden = true;
  if (!results.length) {
    grid.replaceChildren(
      make("li", { className: "empty", text: "Nothing scored above the minimum. Try other words." }),
    );
    return;
  }
  grid.replaceChildren(
    ...results.map((item) => {
      const caption = item.caption || `Image #${item.id}`;
      const img = make("img", { alt: caption, loading: "lazy", width: item.width, height: item.height });
      showImage(img, item.thumbnail);
      const card = make(
        "button",
        { type: "button", className: "card", title: "Find images like this one", "data-id": item.id },
        [
          make("span", { className: "thumb" }, [img]),
          make("span", { className: "card-meta" }, [
            make("span", { className: "score", text: item.score.toFixed(3), title: "Cosine similarity" }),
            make("span", { className: "caption", text: caption }),
          ]),
        ],
      );
      card.setAttribute("aria-label", `${caption}, score ${item.score.toFixed(3)}: find similar images`);
      card.addEventListener("click", () => searchSimilarTo(item, caption));
      const actions = make("span", { className: "card-actions" }, [
        make("span", { className: "muted", text: `#${item.id}` }),
        termButton(item.id, "+", `Add image #${item.id} to the query`),
        termButton(item.id, "-", `Subtract image #${item.id} from the query`),
      ]);
      return make("li", { className: "result" }, [card, actions]);
    }),
  );
  if (element("heat-toggle").checked) showHeatMaps();
}

// "+" or "-" beside a result: adds the image to the query as a term and searches again.
function termButton(id, sign, label) {
  const button = make("button", { type: "button", className: "term", text: sign === "+" ? "+" : "−" });
  button.setAttribute("aria-label", label);
  button.title = label;
  button.addEventListener("click", () => {
    const input = element("search-input");
    const current = input.value.trim() || state.heatQuery || "";
    input.value = current ? `${current} ${sign} #${id}` : `${sign === "-" ? "- " : ""}#${id}`;
    searchText(input.value.trim());
  });
  return button;
}

// Heat maps: each result's thumbnail gets the model's view of it with the query's relevance map painted on.
function showHeatMaps() {
  const cards = [...element("search-results").querySelectorAll("button.card")];
  if (!state.heatQuery) {
    element("search-error").textContent = "Heat maps follow text and #ID queries, not an uploaded image.";
    element("search-error").hidden = false;
    return;
  }
  const query = state.heatQuery;
  for (const card of cards) {
    const thumb = card.querySelector(".thumb");
    if (thumb.querySelector(".heat-overlay")) continue;
    const overlay = make("img", { className: "heat-overlay pixelated", alt: "" });
    thumb.append(overlay);
    const params = new URLSearchParams({ q: query });
    apiJson(`/api/explain/${encodeURIComponent(card.dataset.id)}?${params}`)
      .then((answer) => {
        if (state.heatQuery !== query) return; // a newer search replaced these results
        overlay.alt = `Where “${query}” matches image #${card.dataset.id} (peak at ${answer.peak.join(", ")})`;
        overlay.src = answer.overlay;
      })
      .catch((problem) => {
        overlay.remove();
        thumb.title = `No heat map: ${problem.message}`;
      });
  }
}

function hideHeatMaps() {
  element("search-results")
    .querySelectorAll(".heat-overlay")
    .forEach((overlay) => overlay.remove());
}

function searchText(query) {
  showQuery([make("span", { text: "Images matching " }), make("q", { text: query })]);
  state.heatQuery = query;
  return runTask("search", async () => {
    const params = new URLSearchParams({ q: query, k: searchCount() });
    const answer = await apiJson(`/api/query?${params}`);
    renderSearchResults(answer.results);
  });
}

function searchSimilarTo(item, caption) {
  const thumb = make("img", { alt: "", className: "query-thumb" });
  showImage(thumb, item.thumbnail);
  showQuery([make("span", { text: "Images like " }), thumb, make("q", { text: caption })]);
  window.scrollTo({ top: 0, behavior: "smooth" });
  state.heatQuery = `#${item.id}`;
  return runTask("search", async () => {
    const answer = await apiJson(`/api/similar/${encodeURIComponent(item.id)}?k=${searchCount()}`);
    renderSearchResults(answer.results);
  });
}

function searchSimilarToFile(file) {
  const thumb = make("img", { alt: "", className: "query-thumb", src: URL.createObjectURL(file) });
  showQuery([make("span", { text: "Images like " }), thumb, make("q", { text: file.name })]);
  state.heatQuery = null;
  return runTask("search", async () => {
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("k", searchCount());
    const answer = await apiJson("/api/similar", { method: "POST", body: form });
    renderSearchResults(answer.results);
  });
}

function wireSearch() {
  element("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = element("search-input").value.trim();
    if (query) searchText(query);
  });
  wireDropzone(element("similar-drop"), element("similar-file"), "search", searchSimilarToFile);
  element("heat-toggle").addEventListener("change", (event) => {
    if (event.target.checked) showHeatMaps();
    else hideHeatMaps();
  });
  // Pasting an image (Ctrl+V) on the search tab searches with it too.
  document.addEventListener("paste", (event) => {
    if (element("panel-search").hidden || !state.info || !state.info.search) return;
    const file = [...event.clipboardData.files].find((candidate) => candidate.type.startsWith("image/"));
    if (file) searchSimilarToFile(file);
  });
}

// ------------------------------------------------------------------------------------------------- zero-shot

function setPreview(zone, img, file) {
  img.src = URL.createObjectURL(file);
  img.alt = `Chosen image: ${file.name}`;
  img.hidden = false;
  zone.classList.add("has-image");
  zone
    .querySelector(".drop-text")
    .replaceChildren(make("strong", { text: file.name }), make("span", { text: "Drop or click to choose another" }));
}

function renderBars(results) {
  const list = element("classify-results");
  list.replaceChildren(
    ...results.map((item, rank) => {
      const percent = (100 * item.probability).toFixed(1);
      const fill = make("span", { className: "bar-fill" });
      fill.style.width = `${Math.max(0.5, 100 * item.probability)}%`;
      return make(
        "li",
        { className: rank === 0 ? "bar-row top" : "bar-row", "aria-label": `${item.label}: ${percent} %` },
        [
          make("span", { className: "bar-label", text: item.label, title: `score ${item.score.toFixed(3)}` }),
          make("span", { className: "bar-track", "aria-hidden": "true" }, [fill]),
          make("span", { className: "bar-value", text: `${percent} %`, "aria-hidden": "true" }),
        ],
      );
    }),
  );
}

function wireClassify() {
  const zone = element("classify-drop");
  wireDropzone(zone, element("classify-file"), "classify", (file) => {
    state.classifyFile = file;
    setPreview(zone, element("classify-preview"), file);
  });
  element("classify-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.classifyFile) {
      showError("classify", "Choose an image to classify first.");
      return;
    }
    runTask("classify", async () => {
      const form = new FormData();
      form.append("image", state.classifyFile, state.classifyFile.name);
      form.append("labels", element("classify-labels").value);
      const template = element("classify-template").value.trim();
      if (template) form.append("template", template);
      const answer = await apiJson("/api/classify", { method: "POST", body: form });
      renderBars(answer.results);
    });
  });
}

// ------------------------------------------------------------------------------------------------- describe

function renderCaption(answer) {
  const parts = [
    make("p", { className: "caption-text", text: answer.caption }),
    make("p", {
      className: "muted",
      text: `${answer.method === "captioner" ? "Written by the captioner" : "Composed from labels"}, CLIP score ${
        answer.score.toFixed(3)
      }`,
    }),
  ];
  if (answer.terms) {
    const tables = Object.entries(answer.terms).map(([table, terms]) =>
      make("li", {}, [
        make("strong", { text: `${table}: ` }),
        make("span", { text: terms.map((term) => `${term.term} ${term.score.toFixed(3)}`).join(" · ") }),
      ]),
    );
    parts.push(make("ul", { className: "terms", "aria-label": "Best terms per table" }, tables));
  }
  if (answer.candidates) {
    const candidates = answer.candidates.map((candidate) =>
      make("li", { text: `${candidate.caption} (${candidate.score.toFixed(3)})` }),
    );
    parts.push(make("ol", { className: "terms", "aria-label": "Sampled captions, best first" }, candidates));
  }
  element("describe-results").replaceChildren(...parts);
}

function renderExplanation(answer) {
  const picture = make("img", {
    className: "explained pixelated",
    src: answer.overlay,
    alt: `Where “${answer.text}” matches the image: hottest at ${answer.peak.join(", ")}`,
  });
  element("describe-results").replaceChildren(
    picture,
    make("p", {
      className: "muted",
      text: `“${answer.text}”: CLIP score ${answer.score.toFixed(3)}, ${answer.method} map`,
    }),
  );
}

function wireDescribe() {
  const zone = element("describe-drop");
  wireDropzone(zone, element("describe-file"), "describe", (file) => {
    state.describeFile = file;
    setPreview(zone, element("describe-preview"), file);
  });
  const needFile = () => {
    if (state.describeFile) return true;
    showError("describe", "Choose an image first.");
    return false;
  };
  element("describe-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!needFile()) return;
    runTask("describe", async () => {
      const form = new FormData();
      form.append("image", state.describeFile, state.describeFile.name);
      const labels = element("describe-labels").value.trim();
      if (labels) form.append("labels", labels);
      renderCaption(await apiJson("/api/caption", { method: "POST", body: form }));
    });
  });
  element("describe-explain").addEventListener("click", () => {
    const query = element("describe-query").value.trim();
    if (!needFile()) return;
    if (!query) {
      showError("describe", "Type what to look for, e.g. “a red heart”.");
      return;
    }
    runTask("describe", async () => {
      const form = new FormData();
      form.append("image", state.describeFile, state.describeFile.name);
      form.append("q", query);
      renderExplanation(await apiJson("/api/explain", { method: "POST", body: form }));
    });
  });
}

// ------------------------------------------------------------------------------------------------- duplicates

function renderDuplicates(answer) {
  const summary = element("duplicates-summary");
  summary.textContent =
    `${answer.groups_total} group${answer.groups_total === 1 ? "" : "s"}: ${answer.grouped} of ` +
    `${answer.images} images have a near-duplicate (` +
    (answer.method === "pixels"
      ? `${answer.candidates} look-alike pairs checked on the pixels, difference at most ${answer.pixel_threshold}).`
      : `cosine above ${answer.threshold}).`);
  summary.hidden = false;
  element("duplicates-threshold").placeholder = String(answer.threshold);
  element("duplicates-results").replaceChildren(
    ...answer.groups.map((group) => {
      const images = group.images.map((image) => {
        const caption = image.caption || `Image #${image.id}`;
        const img = make("img", { alt: `#${image.id}: ${caption}`, loading: "lazy" });
        showImage(img, image.thumbnail);
        return make("li", { className: "member" }, [
          make("a", { href: image.url, target: "_blank", rel: "noopener", title: caption }, [img]),
          make("span", { className: "muted", text: `#${image.id}` }),
        ]);
      });
      let range = `cosine ${group.min_score.toFixed(3)}–${group.max_score.toFixed(3)}`;
      if (group.max_pixel_distance !== null) range += ` · pixel difference ≤ ${group.max_pixel_distance.toFixed(3)}`;
      return make("li", { className: "group" }, [
        make("p", { className: "group-title", text: `${group.ids.length} images · ${range}` }),
        make("ul", { className: "members" }, images),
      ]);
    }),
  );
}

function wireDuplicates() {
  element("duplicates-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const threshold = element("duplicates-threshold").value.trim();
    const method = element("duplicates-method").value;
    runTask("duplicates", async () => {
      const params = new URLSearchParams({ max_groups: 50, method });
      if (threshold) params.set("threshold", threshold);
      renderDuplicates(await apiJson(`/api/duplicates?${params}`));
    });
  });
}

// ------------------------------------------------------------------------------------------------- generate, edit

function renderGenerated(panel, answer, what) {
  const grid = element(`${panel}-results`);
  grid.replaceChildren(
    ...answer.images.map((item, rank) => {
      const alt = `${what} ${rank + 1} for “${answer.prompt}”`;
      const img = make("img", { src: item.image, alt, className: "pixelated" });
      const clip = item.clip_score === null || item.clip_score === undefined ? null : item.clip_score.toFixed(3);
      const details = `log-likelihood ${item.log_likelihood.toFixed(1)} · seed ${item.seed}`;
      const slug =
        answer.prompt
          .replace(/[^a-z0-9]+/gi, "-")
          .replace(/^-|-$/g, "")
          .slice(0, 40) || "image";
      return make("li", { className: "card static" }, [
        make("span", { className: "thumb" }, [img]),
        make("span", { className: "card-meta" }, [
          clip === null
            ? make("span", { className: "score muted", text: `#${rank + 1}` })
            : make("span", { className: "score", text: `CLIP ${clip}`, title: "CLIP similarity to the prompt" }),
          make("span", { className: "caption muted", text: details }),
          make("a", { href: item.image, download: `${slug}-${rank + 1}.png`, className: "download", text: "Download" }),
        ]),
      ]);
    }),
  );
  grid.dataset.nativeSize = answer.native_size;
}

// Suggestions come from the DALL·E model's own training captions: prompts it knows how to draw.
async function suggestPrompts() {
  const typed = element("generate-prompt").value;
  try {
    const answer = await apiJson(`/api/prompts?${new URLSearchParams({ q: typed, k: "10" })}`);
    if (element("generate-prompt").value !== typed) return; // the user typed on meanwhile
    element("generate-suggestions").replaceChildren(
      ...answer.suggestions.map((text) => make("option", { value: text })),
    );
  } catch (error) {
    element("generate-suggestions").replaceChildren(); // suggestions are a convenience; generation still works
  }
}

function showNotice(id, text) {
  const notice = element(id);
  notice.textContent = text || "";
  notice.hidden = !text;
}

function wireGenerate() {
  let pending = null;
  element("generate-prompt").addEventListener("input", () => {
    clearTimeout(pending);
    pending = setTimeout(suggestPrompts, 150);
  });
  element("generate-prompt").addEventListener("focus", suggestPrompts, { once: true });
  element("generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const seedText = element("generate-seed").value.trim();
    const body = {
      prompt: element("generate-prompt").value.trim(),
      n: Number(element("generate-n").value),
      keep: Number(element("generate-keep").value),
      seed: seedText === "" ? null : Number(seedText),
    };
    runTask("generate", async () => {
      const answer = await apiJson("/api/generate", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      showNotice("generate-notice", answer.notice);
      renderGenerated("generate", answer, "Generated image");
    });
  });
}

// The edit canvas shows the uploaded image scaled to the panel; the box is kept in the image's own pixels.
function drawEditCanvas() {
  const canvas = element("edit-canvas");
  const image = state.editImage;
  if (!image) return;
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth || 320;
  const cssHeight = (cssWidth * image.naturalHeight) / image.naturalWidth;
  canvas.style.height = `${cssHeight}px`;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = image.naturalWidth >= canvas.width; // crisp pixels when scaling up
  context.drawImage(image, 0, 0, canvas.width, canvas.height);
  if (!state.editBox) return;
  const scale = canvas.width / image.naturalWidth;
  const [x0, y0, x1, y1] = state.editBox.map((value) => value * scale);
  context.fillStyle = "rgba(15, 23, 42, 0.45)"; // shade what stays, keep the box clear
  context.beginPath();
  context.rect(0, 0, canvas.width, canvas.height);
  context.rect(x0, y0, x1 - x0, y1 - y0);
  context.fill("evenodd");
  context.lineWidth = 2 * ratio;
  context.setLineDash([6 * ratio, 4 * ratio]);
  context.strokeStyle = "#ffffff";
  context.strokeRect(x0, y0, x1 - x0, y1 - y0);
}

function imagePoint(event) {
  const canvas = element("edit-canvas");
  const rect = canvas.getBoundingClientRect();
  const width = state.editImage.naturalWidth;
  const height = state.editImage.naturalHeight;
  const x = Math.min(Math.max(((event.clientX - rect.left) / rect.width) * width, 0), width);
  const y = Math.min(Math.max(((event.clientY - rect.top) / rect.height) * height, 0), height);
  return [x, y];
}

// A box from two corners: covers every pixel the drag touched, end exclusive, at least one pixel.
function boxFromCorners([ax, ay], [bx, by]) {
  const width = state.editImage.naturalWidth;
  const height = state.editImage.naturalHeight;
  const x0 = Math.min(Math.floor(Math.min(ax, bx)), width - 1);
  const y0 = Math.min(Math.floor(Math.min(ay, by)), height - 1);
  const x1 = Math.max(Math.ceil(Math.max(ax, bx)), x0 + 1);
  const y1 = Math.max(Math.ceil(Math.max(ay, by)), y0 + 1);
  return [x0, y0, Math.min(x1, width), Math.min(y1, height)];
}

function setEditBox(box) {
  state.editBox = box;
  element("edit-box").value = box ? box.join(",") : "";
  drawEditCanvas();
}

function wireEdit() {
  const zone = element("edit-drop");
  const canvas = element("edit-canvas");
  const wrap = element("edit-canvas-wrap");
  wireDropzone(zone, element("edit-file"), "edit", (file) => {
    const image = new Image();
    image.addEventListener("load", () => {
      state.editFile = file;
      state.editImage = image;
      zone.hidden = true;
      wrap.hidden = false;
      // Start with the middle half selected so "Fill the box" works before any drawing.
      const [width, height] = [image.naturalWidth, image.naturalHeight];
      setEditBox([
        Math.floor(width / 4),
        Math.floor(height / 4),
        Math.ceil((3 * width) / 4),
        Math.ceil((3 * height) / 4),
      ]);
    });
    image.addEventListener("error", () => showError("edit", `The browser cannot read ${file.name} as an image.`));
    image.src = URL.createObjectURL(file);
  });
  element("edit-change").addEventListener("click", () => element("edit-file").click());
  let start = null;
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.editImage) return;
    start = imagePoint(event);
    canvas.setPointerCapture(event.pointerId);
    setEditBox(boxFromCorners(start, start));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (start) setEditBox(boxFromCorners(start, imagePoint(event)));
  });
  const finish = (event) => {
    if (start) setEditBox(boxFromCorners(start, imagePoint(event)));
    start = null;
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", () => (start = null));
  element("edit-box").addEventListener("input", () => {
    const numbers = element("edit-box")
      .value.split(",")
      .map((part) => Number(part.trim()));
    const valid = numbers.length === 4 && numbers.every((number) => Number.isInteger(number) && number >= 0);
    if (valid && state.editImage) {
      state.editBox = numbers;
      drawEditCanvas();
    }
  });
  new ResizeObserver(drawEditCanvas).observe(wrap);
  element("edit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.editFile) {
      showError("edit", "Choose an image to edit first.");
      return;
    }
    runTask("edit", async () => {
      const form = new FormData();
      form.append("image", state.editFile, state.editFile.name);
      form.append("prompt", element("edit-prompt").value.trim());
      form.append("box", element("edit-box").value.replace(/\s+/g, ""));
      form.append("n", element("edit-n").value);
      form.append("keep", element("edit-keep").value);
      const answer = await apiJson("/api/inpaint", { method: "POST", body: form });
      renderGenerated("edit", answer, "Candidate");
    });
  });
}

// ------------------------------------------------------------------------------------------------- start

// A file dropped outside a drop zone must not navigate away from the page.
for (const name of ["dragover", "drop"]) window.addEventListener(name, (event) => event.preventDefault());

wireTabs();
wireAuth();
wireSearch();
wireClassify();
wireDescribe();
wireDuplicates();
wireGenerate();
wireEdit();
loadInfo();
