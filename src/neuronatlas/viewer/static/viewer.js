// neuronatlas viewer: the neuron jump box of static reports and the live text form.
// Every text from the server is set with textContent, never parsed as HTML.
"use strict";

function activationColour(value, scale) {
  if (value === null || value === undefined || !(scale > 0) || !isFinite(value)) return "transparent";
  const strength = Math.min(Math.abs(value) / scale, 1);
  const rgb = value > 0 ? "230, 90, 20" : "40, 110, 220";
  return "rgba(" + rgb + ", " + (0.85 * strength).toFixed(3) + ")";
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function staticJump(form) {
  const root = form.dataset.staticRoot;
  if (!root) return;
  const note = element("span", undefined, "jump-note");
  note.id = "jump-note";
  form.appendChild(note);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const layer = parseInt(form.elements.layer.value, 10), index = parseInt(form.elements.index.value, 10);
    const missing = missingPage(window.NEURONATLAS_PAGES, layer, index);
    note.textContent = missing || "";
    if (!missing) window.location.href = root + "neuron/" + layer + "/" + index + ".html";
  });
}

// Why a report has no page for this neuron (null when it has one): pages.js lists the pages written.
function missingPage(pages, layer, index) {
  if (!pages) return null;
  const widths = pages.widths;
  if (!(layer >= 0 && layer < widths.length)) return "no layer " + layer + ": the layers are 0-" + (widths.length - 1);
  if (!(index >= 0 && index < widths[layer])) {
    return "no neuron " + index + " in layer " + layer + ": its neurons are 0-" + (widths[layer] - 1);
  }
  if (pages.layers && !pages.layers[layer].includes(index)) {
    return "L" + layer + "/" + index + " has no page in this report (" + pages.written.toLocaleString("en") + " of " +
      pages.total.toLocaleString("en") + " neurons have one; write it with `neuronatlas report --neurons SET.json` or --all)";
  }
  return null;
}

// The reply's spans (tokens joined into whole characters), each coloured by the max of its tokens'
// values; a reply without spans shows one span per token.
function showTokens(container, reply, values, caption) {
  const scale = Math.max(...values.map((v) => Math.abs(v)), 0);
  container.replaceChildren(element("p", caption, "meta"));
  const line = element("div", undefined, "tokens");
  line.id = "live-tokens";
  const spans = reply.spans || reply.tokens.map((token, i) => ({ text: token, tokens: [i] }));
  spans.forEach((item) => {
    const value = Math.max(...item.tokens.map((i) => values[i]));
    const span = element("span", item.text, "tok");
    const lines = item.tokens.map((i) => JSON.stringify(reply.tokens[i]) + ": " + values[i].toFixed(4));
    span.title = item.tokens.length === 1 ? lines[0] : lines.join("\n") + "\nmax: " + value.toFixed(4);
    span.dataset.value = value;
    span.style.background = activationColour(value, scale);
    line.appendChild(span);
  });
  container.appendChild(line);
}

function showLive(form, reply) {
  const result = document.getElementById("live-result");
  const tokensBox = element("div");
  const root = form.dataset.root;
  result.replaceChildren(tokensBox);
  const show = (item) => showTokens(tokensBox, reply, item.activations,
    "L" + item.layer + "/" + item.index + ": max " + item.max.toFixed(4) + " (hover a token for its value)");
  show(reply.neuron || reply.top[0]);
  if (reply.truncated) result.appendChild(element("p", "The text was cut to " + reply.max_tokens + " tokens.", "meta"));
  result.appendChild(element("h2", "Most active neurons"));
  const table = element("table", undefined, "numbers top");
  table.id = "live-top";
  const head = element("tr");
  ["neuron", "max activation", ""].forEach((name) => head.appendChild(element("th", name)));
  table.appendChild(head);
  reply.top.forEach((item) => {
    const row = element("tr");
    const cell = element("td");
    const link = element("a", "L" + item.layer + "/" + item.index);
    link.href = root + item.layer + "/" + item.index;
    cell.appendChild(link);
    row.appendChild(cell);
    row.appendChild(element("td", item.max.toFixed(4)));
    const button = element("button", "colour the text");
    button.type = "button";
    button.addEventListener("click", () => show(item));
    const action = element("td");
    action.appendChild(button);
    row.appendChild(action);
    table.appendChild(row);
  });
  result.appendChild(table);
}

function liveForm(form) {
  const status = document.getElementById("live-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { text: form.elements.text.value };
    if (form.elements.layer.value !== "" && form.elements.index.value !== "") {
      body.layer = parseInt(form.elements.layer.value, 10);
      body.index = parseInt(form.elements.index.value, 10);
    }
    status.textContent = "running the model…";
    try {
      const response = await fetch(form.dataset.api, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const reply = await response.json();
      if (!response.ok) { status.textContent = reply.error || response.statusText; return; }
      status.textContent = reply.tokens.length + " tokens";
      showLive(form, reply);
    } catch (error) {
      status.textContent = "the server did not answer: " + error;
    }
  });
}

document.querySelectorAll("form.jump").forEach(staticJump);
const live = document.getElementById("live-form");
if (live) liveForm(live);

// ---- search in a static report: window.NEURONATLAS_SEARCH holds what each neuron page shows ----

function matchesOf(entry, by, query) {
  const words = query.toLowerCase().split(/\s+/).filter((w) => w);
  const same = (text) => String(text).trim().toLowerCase() === query.trim().toLowerCase();
  if (by === "token") {
    const hits = Object.entries(entry.peaks).filter(([token]) => same(token));
    if (!hits.length) return [];
    return [{ exemplars: hits.reduce((sum, [, count]) => sum + count, 0), activation: entry.max }];
  }
  if (by === "promotes") {
    const hit = entry.promotes.find(([token]) => same(token));
    return hit ? [{ token: hit[0], logit: hit[1] }] : [];
  }
  if (by === "label" || by === "method") {
    return entry.sets.filter((item) => by === "label" ? same(item.label || "")
      : same(item.method) || same(item.set)).map((item) => ({ ...item }));
  }
  return entry.explanations.filter((item) => {
    const text = [item.explanation, ...item.clusters].join(" ").toLowerCase();
    return words.length && words.every((word) => text.includes(word));
  }).map((item) => ({ explanation: item.explanation, score: item.score, source: item.source }));
}

// Best first: a set's own order (its rank: LAPE's lowest entropy first), else the largest number.
function sortKey(row) {
  return row.rank ?? -(row.exemplars ?? row.logit ?? row.score ?? 0);
}

function formatCell(value) {
  if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(4);
  return value === null || value === undefined ? "" : String(value);
}

function staticSearch(table) {
  const params = new URLSearchParams(window.location.search);
  const by = params.get("by") || "token", query = (params.get("q") || "").trim();
  const page = Math.max(1, parseInt(params.get("page") || "1", 10));
  const index = window.NEURONATLAS_SEARCH;
  const columns = JSON.parse(table.dataset.columns)[by] || [];
  document.getElementById("search-by").value = by;
  document.getElementById("search-q").value = query;
  if (!query || !index) return;
  const rows = [];
  index.neurons.forEach((entry) => matchesOf(entry, by, query).forEach((row) =>
    rows.push({ ...row, layer: entry.layer, index: entry.index })));
  rows.sort((a, b) => sortKey(a) - sortKey(b) || a.layer - b.layer || a.index - b.index);
  const pages = Math.max(1, Math.ceil(rows.length / index.per_page));
  const shown = rows.slice((page - 1) * index.per_page, page * index.per_page);
  document.getElementById("search-count").textContent = rows.length.toLocaleString("en") + " neuron" +
    (rows.length === 1 ? "" : "s") + " found" + (pages > 1 ? "; page " + page + " of " + pages : "") + ".";
  const head = element("tr");
  ["neuron", ...columns].forEach((name) => head.appendChild(element("th", name)));
  table.replaceChildren(head);
  shown.forEach((row) => {
    const line = element("tr"), cell = element("td"), link = element("a", "L" + row.layer + "/" + row.index);
    link.href = "neuron/" + row.layer + "/" + row.index + ".html";
    cell.appendChild(link);
    line.appendChild(cell);
    columns.forEach((name) => line.appendChild(element("td", formatCell(row[name]))));
    table.appendChild(line);
  });
  const nav = document.getElementById("static-pages");
  const pageLink = (number, text) => {
    const link = element("a", text);
    link.href = "search.html?" + new URLSearchParams({ by: by, q: query, page: number });
    nav.appendChild(link);
    nav.appendChild(document.createTextNode(" "));
  };
  if (page > 1) pageLink(page - 1, "← previous");
  if (page < pages) pageLink(page + 1, "next →");
}

const staticResults = document.querySelector("#results[data-columns]");
if (staticResults) staticSearch(staticResults);

// ---- windows of text coloured by activation (see plots.token_spans): one element per window, cut here ----

// data-q: each value in thousandths of the scale as two base-64 digits, offset by 2048; ".." unknown
const BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
function quanta(text, unit) {
  const values = [];
  for (let at = 0; at + 1 < text.length; at += 2) {
    values.push(text[at] === "." ? null : ((BASE64.indexOf(text[at]) << 6) + BASE64.indexOf(text[at + 1]) - 2048) * unit);
  }
  return values;
}

// data-s: a base-36 digit per span of one token, "~length:tokens;" for the others (plots.token_spans)
function spanLengths(text) {
  const spans = [];
  for (let at = 0; at < text.length; at++) {
    if (text[at] === "~") {
      const end = text.indexOf(";", at);
      spans.push(text.slice(at + 1, end).split(":").map(Number));
      at = end;
    } else {
      spans.push([parseInt(text[at], 36), 1]);
    }
  }
  return spans;
}

function paintWindow(node, scale) {
  const quantised = node.dataset.q !== undefined;
  const values = quantised ? quanta(node.dataset.q, scale / 1000)
    : node.dataset.v.split(",").map((v) => (v === "" ? null : parseFloat(v)));
  const digits = quantised ? Math.max(0, 3 - Math.floor(Math.log10(scale))) : 4;  // as precise as written
  const titles = node.dataset.m ? JSON.parse(node.dataset.m) : [];
  const chars = Array.from(node.textContent);  // code points, as the server counted them
  const peak = parseInt(node.dataset.p, 10);
  let at = 0, token = 0, multi = 0;
  node.textContent = "";
  spanLengths(node.dataset.s).forEach(([length, count]) => {
    const own = values.slice(token, token + count).filter((v) => v !== null && isFinite(v));
    const value = own.length ? Math.max(...own) : null;
    const kind = "tok" + (value !== null && value < 0 ? " neg" : "") + (peak >= token && peak < token + count ? " peak" : "");
    const span = element("span", chars.slice(at, at + length).join(""), kind);
    if (value !== null && scale > 0) span.style.setProperty("--a", (0.85 * Math.min(Math.abs(value) / scale, 1)).toFixed(3));
    span.title = count > 1 ? titles[multi++] : value === null ? "unknown" : value.toFixed(digits);
    node.appendChild(span);
    at += length;
    token += count;
  });
}

function paintWindows(root) {
  root.querySelectorAll(".tokens[data-v], .tokens[data-q]").forEach((node) => {
    const holder = node.closest("[data-scale]");
    paintWindow(node, holder ? parseFloat(holder.dataset.scale) : 0);
  });
}

// A neuron page without samples asks the server to draw them, then shows the section it returns.
async function loadSamples(placeholder) {
  try {
    const response = await fetch(placeholder.dataset.samples);
    const section = new DOMParser().parseFromString(await response.text(), "text/html").getElementById("samples");
    if (!section) throw new Error(response.statusText);
    paintWindows(section);
    document.getElementById("samples").replaceWith(document.adoptNode(section));
  } catch (error) {
    placeholder.textContent = "the samples could not be drawn: " + error;
  }
}

paintWindows(document);
document.querySelectorAll("[data-samples]").forEach(loadSamples);

// ---- the activation histogram of a neuron page (see plots.histogram): drawn from its bins ----

const SVG = "http://www.w3.org/2000/svg";

function svgElement(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  Object.entries(attributes).forEach(([name, value]) => node.setAttribute(name, value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function binName(edges, i) {
  const shown = (value) => Number(value).toPrecision(3).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
  if (i === 0) return "< " + shown(edges[0]);
  if (i >= edges.length) return ">= " + shown(edges[edges.length - 1]);
  return "[" + shown(edges[i - 1]) + ", " + shown(edges[i]) + ")";
}

function drawHistogram(svg) {
  const edgesText = svg.dataset.e ?? window.NEURONATLAS_PAGES.edges;  // a report's pages.js holds them once
  const edges = edgesText.split(",").map(Number), counts = svg.dataset.c.split(",").map(Number);
  const width = Number(svg.getAttribute("width")), height = Number(svg.getAttribute("height"));
  const bottom = height - 34, top = 20, left = 40, bins = counts.length;
  const barWidth = (width - left - 10) / Math.max(bins, 1);
  const peak = Math.log1p(Math.max(0, ...counts)) || 1;
  svg.appendChild(svgElement("line", { x1: left, y1: bottom, x2: width - 10, y2: bottom, class: "axis" }));
  counts.forEach((count, i) => {
    if (!count) return;  // nothing to draw (or hover)
    const bar = (bottom - top) * Math.log1p(count) / peak;
    const rect = svgElement("rect", { x: (left + i * barWidth).toFixed(1), y: (bottom - bar).toFixed(1),
      width: Math.max(barWidth - 1, 1).toFixed(1), height: bar.toFixed(1), class: "bar" });
    rect.appendChild(svgElement("title", {}, binName(edges, i) + ": " + count.toLocaleString("en") + " tokens"));
    svg.appendChild(rect);
  });
  for (let i = 0; i < bins; i += Math.max(Math.floor(bins / 8), 1)) {
    if (i > 0 && i <= edges.length) {
      svg.appendChild(svgElement("text", { x: (left + i * barWidth).toFixed(1), y: bottom + 14, "text-anchor": "middle",
        class: "tick" }, Number(edges[i - 1]).toPrecision(3).replace(/\.?0+$/, "")));
    }
  }
  svg.appendChild(svgElement("text", { x: left, y: height - 4, class: "tick" },
    "activation (bin edges log-spaced); bar height: log(1 + tokens)"));
}

document.querySelectorAll("svg.hist[data-c]").forEach(drawHistogram);
