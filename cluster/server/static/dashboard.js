// The dashboard: reads GET /status every POLL_MS and redraws nodes, placement, expert load, speed and events.
"use strict";

const POLL_MS = 2000;
const CHARTS = [
  {key: "decode_tps", title: "Decode", unit: "tokens/s"},
  {key: "prefill_tps", title: "Prefill", unit: "tokens/s"},
  {key: "ttft_s", title: "Time to first token", unit: "s"},
  {key: "running", title: "Running sequences", unit: ""},
  {key: "waiting", title: "Waiting sequences", unit: ""},
  {key: "prompt_reuse", title: "Prompt reuse", unit: "%", scale: 100},
  {key: "draft_acceptance", title: "Drafts accepted", unit: "%", scale: 100},
];

let lastStatus = null;  // drawn again when the window changes size (a phone turned)

async function poll() {
  try {
    const response = await fetchWithKey("/status");
    lastStatus = await response.json();
    render(lastStatus);
  } catch (error) {
    if (error instanceof KeyRefused) {
      askForKey(poll, storedKey() !== "");
      return;  // polling resumes once a key is entered
    }
    showState("unreachable");
  }
  setTimeout(poll, POLL_MS);
}

function render(status) {
  const model = status.model;
  document.getElementById("model").textContent =
    [model.name, model.quantization, formatBytes(model.file_bytes), model.context + " tokens of context"]
      .filter(Boolean).join(" · ");
  showState(status.state, status.error);
  renderNodes(status.nodes || []);
  renderPlacement(status.placement);
  renderHeat(status.heat);
  renderCharts(status.speed || []);
  renderEvents(status.events || []);
}

function showState(state, why) {
  const badge = document.getElementById("server-state");
  badge.textContent = state;
  badge.className = "badge state-" + state;
  badge.title = why || "";
}

function renderNodes(nodes) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren(...nodes.map((node) => {
    const held = (node.expert_bytes || 0) + (node.replica_bytes || 0);
    const heldText = node.head_bytes ?
      formatBytes(held) + " experts + " + formatBytes(node.head_bytes) + " weights and KV" : formatBytes(held);
    const experts = node.experts === undefined ? "all" :
      node.experts + (node.replicas ? " + " + node.replicas + " replicas" : "");
    const budget = node.budget_bytes ? element("div", {class: "bar"},
      element("span", {style: "width:" + Math.min(100, 100 * held / node.budget_bytes).toFixed(1) + "%"})) : null;
    return element("tr", {"data-node": node.name},
      element("td", {class: "name"}, element("strong", {}, node.name)),
      element("td", {}, node.machine || "–"),
      element("td", {}, node.role),
      element("td", {class: "node-state"}, element("span", {class: "badge state-" + node.state}, node.state),
        stateDetail(node)),
      element("td", {class: "num"}, experts),
      element("td", {class: "num"}, heldText, budget),
      element("td", {class: "num"}, node.free_bytes === undefined ? "–" : formatBytes(node.free_bytes)),
      element("td", {}, node.tier || "–"),
      element("td", {class: "num"}, node.round_trip_ms == null ? "–" : node.round_trip_ms.toFixed(2) + " ms"));
  }));
}

function stateDetail(node) {
  if (node.state === "ok") return null;
  const parts = [node.reason];
  if (node.down_s !== undefined) parts.push("down " + node.down_s.toFixed(0) + " s");
  if (node.covered_by && node.covered_by.length) parts.push("computed by " + node.covered_by.join(", "));
  if (node.taken_over_by && node.taken_over_by.length) parts.push("taken over by " + node.taken_over_by.join(", "));
  if (node.loaded !== null && node.loaded !== undefined) {
    parts.push((node.state === "loading" ? "loaded " : "loading again: ") + (100 * node.loaded).toFixed(0) + "%");
  }
  return element("div", {class: "why"}, parts.filter(Boolean).join("; "));
}

function renderPlacement(placement) {
  const table = document.getElementById("placement");
  if (!placement) {
    table.tHead.replaceChildren();
    table.tBodies[0].replaceChildren(element("tr", {}, element("td", {class: "muted"}, "Every expert is on the head.")));
    return;
  }
  table.tHead.replaceChildren(element("tr", {}, element("th", {}, "Layer"),
    ...placement.nodes.map((node) => element("th", {}, node))));
  table.tBodies[0].replaceChildren(...placement.layers.map((layer, row) => {
    const owned = placement.experts[row];
    const total = owned.reduce((a, b) => a + b, 0) || 1;
    return element("tr", {}, element("td", {}, layer), ...owned.map((count, column) => {
      const replicas = placement.replicas[row][column];
      return element("td", {class: "num", title: (100 * count / total).toFixed(0) + "% of layer " + layer},
        count + (replicas ? " +" + replicas : ""),
        element("div", {class: "bar"}, element("span", {style: "width:" + (100 * count / total).toFixed(1) + "%"})));
    }));
  }));
}

function renderHeat(heat) {
  const canvas = document.getElementById("heat");
  const note = document.getElementById("heat-note");
  if (!heat || !heat.counts.length) {
    note.textContent = "(no routing counts: the experts are all on the head)";
    canvas.hidden = true;
    return;
  }
  canvas.hidden = false;
  note.textContent = "(" + heat.this_run + " picks this run, " + heat.earlier_runs + " kept from earlier runs)";
  const rows = heat.counts.length, columns = heat.counts[0].length;
  canvas.width = columns;
  canvas.height = rows;
  canvas.style.height = Math.max(rows * 6, 40) + "px";
  const context = canvas.getContext("2d");
  const image = context.createImageData(columns, rows);
  const max = Math.max(1, ...heat.counts.map((row) => Math.max(...row)));
  heat.counts.forEach((row, y) => row.forEach((count, x) => {
    const [r, g, b] = heatColor(count / max);
    const i = 4 * (y * columns + x);
    image.data.set([r, g, b, 255], i);
  }));
  context.putImageData(image, 0, 0);
  canvas.onmousemove = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = Math.floor((event.clientX - box.left) / box.width * columns);
    const y = Math.floor((event.clientY - box.top) / box.height * rows);
    if (heat.counts[y] && heat.counts[y][x] !== undefined) {
      document.getElementById("heat-hover").textContent =
        "layer " + heat.layers[y] + ", expert " + x + ": picked " + heat.counts[y][x] + " times";
    }
  };
}

function heatColor(fraction) {
  // dark blue (never picked) through orange to pale yellow (the most picked)
  const stops = [[20, 30, 70], [200, 80, 40], [255, 240, 160]];
  const scaled = Math.sqrt(fraction) * (stops.length - 1);
  const low = Math.min(Math.floor(scaled), stops.length - 2), t = scaled - low;
  return stops[low].map((value, i) => Math.round(value + t * (stops[low + 1][i] - value)));
}

function renderCharts(samples) {
  const box = document.getElementById("charts");
  if (!box.children.length) {
    box.append(...CHARTS.map((chart) => element("div", {class: "chart", id: "chart-" + chart.key},
      element("div", {class: "muted"}, chart.title), element("div", {class: "value"}, "–"), element("canvas"))));
  }
  for (const chart of CHARTS) {
    const points = samples.map((s) => s[chart.key] == null ? null : s[chart.key] * (chart.scale || 1));
    const last = [...points].reverse().find((p) => p !== null);
    const card = document.getElementById("chart-" + chart.key);
    card.querySelector(".value").textContent = last === undefined ? "–" :
      (last < 10 && last % 1 ? last.toFixed(2) : last.toFixed(0)) + (chart.unit ? " " + chart.unit : "");
    drawLine(card.querySelector("canvas"), points);
  }
}

function drawLine(canvas, points) {
  const width = canvas.width = canvas.clientWidth * devicePixelRatio || 300;
  const height = canvas.height = canvas.clientHeight * devicePixelRatio || 60;
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, width, height);
  const known = points.filter((p) => p !== null);
  if (known.length < 1) return;
  if (points.length === 1) points = [points[0], points[0]];  // one sample: a level line across
  const max = Math.max(...known) || 1;
  const step = width / Math.max(points.length - 1, 1);
  context.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--accent");
  context.lineWidth = 2 * devicePixelRatio;
  context.beginPath();
  let drawing = false;
  points.forEach((p, i) => {
    if (p === null) { drawing = false; return; }
    const x = i * step, y = height - 2 - (p / max) * (height - 4);
    if (drawing) context.lineTo(x, y); else context.moveTo(x, y);
    drawing = true;
  });
  context.stroke();
}

function renderEvents(events) {
  if (!events.length) return;
  document.getElementById("events").replaceChildren(...events.slice().reverse().map((event) =>
    element("li", {class: "kind-" + event.kind},
      element("time", {}, new Date(event.time * 1000).toLocaleTimeString()), event.text)));
}

window.addEventListener("resize", () => lastStatus && render(lastStatus));
poll();
