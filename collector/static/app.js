// rmmhunt dashboard: every value goes into the page with textContent, never as HTML.
//
// 500 devices x 60 tools is 30,000 cells. Building and laying them all out took seconds, so the
// table is built PAGE rows at a time (more rows are appended as the bottom of the table scrolls
// into view), each cell is one <td> with one text node, the column widths are fixed (no
// auto table layout), and a cell's tooltip is made when the pointer first reaches it.
"use strict";

const PAGE = 100;

let data = null; // the /api/v1/matrix payload
let grid = null; // Int32Array: grid[device * tools + tool] = index into data.cells, or -1
let view = null; // what the table shows now: { tools: [tool index], devices: [device index], shown }
let observer = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function iso(seconds) {
  return new Date(seconds * 1000).toISOString().replace(/\.\d+Z$/, "Z");
}

function shortDay(seconds) {
  return iso(seconds).slice(5, 10);
}

function shortTime(value) {
  if (typeof value === "number") return iso(value).replace("T", " ");
  return value ? value.replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

async function getJson(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (response.status === 401) { window.location.assign("/"); throw new Error("signed out"); }
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function filters() {
  return {
    tool: document.getElementById("f-tool").value.trim().toLowerCase(),
    device: document.getElementById("f-device").value.trim().toLowerCase(),
    technique: document.getElementById("f-technique").value,
  };
}

function index() {
  const nTools = data.tools.length;
  grid = new Int32Array(data.devices.length * nTools).fill(-1);
  data.cells.forEach((c, i) => { grid[c[0] * nTools + c[1]] = i; });
}

function cellText(c) {
  const [, , first, last, count, running, untrusted] = c;
  return String(count) + (running ? " R" : "") + (untrusted ? " !" : "") + "\n" + shortDay(first) + "→" + shortDay(last);
}

function deviceRow(d) {
  const device = data.devices[d];
  const nTools = data.tools.length;
  const tr = el("tr");
  tr.dataset.device = String(d);
  const name = el("th", device.DeviceName +
    (device.DroppedRows ? " (" + device.DroppedRows + " rows dropped by its outbox)" : ""));
  name.title = device.DeviceId;
  tr.appendChild(name);
  for (const t of view.tools) {
    const i = grid[d * nTools + t];
    if (i < 0) { tr.appendChild(document.createElement("td")); continue; }
    const c = data.cells[i];
    tr.appendChild(el("td", cellText(c), "hit" + (c[5] ? " running" : "") + (c[6] ? " untrusted" : "")));
  }
  return tr;
}

function showMore() {
  if (!view || view.shown >= view.devices.length) return;
  const body = document.querySelector("#matrix tbody");
  const end = Math.min(view.shown + PAGE, view.devices.length);
  const rows = [];
  for (let k = view.shown; k < end; k++) rows.push(deviceRow(view.devices[k]));
  body.append(...rows);
  view.shown = end;
  status();
}

function status() {
  const more = document.getElementById("more");
  more.hidden = view.shown >= view.devices.length;
  document.getElementById("status").textContent =
    view.devices.length + " devices" + (view.shown < view.devices.length ? " (" + view.shown + " shown)" : "") +
    ", " + view.tools.length + " tools, rule set " + data.ruleset_version;
}

function render() {
  const t0 = performance.now();
  const f = filters();
  const nTools = data.tools.length;
  const tools = [];
  data.tools.forEach((t, i) => {
    if ((!f.tool || t.Tool.toLowerCase().includes(f.tool)) && (!f.technique || t.Techniques.includes(f.technique))) {
      tools.push(i);
    }
  });
  const devices = [];
  data.devices.forEach((d, i) => {
    if (f.device && !d.DeviceName.toLowerCase().includes(f.device) && !d.DeviceId.includes(f.device)) return;
    if (tools.some(t => grid[i * nTools + t] >= 0)) devices.push(i);
  });
  view = { tools, devices, shown: 0 };
  const table = document.getElementById("matrix");
  const head = el("thead");
  const hr = el("tr");
  hr.appendChild(el("th", "Device", "device"));
  for (const t of tools) {
    const tool = data.tools[t];
    hr.appendChild(el("th", tool.Tool + " (" + tool.Techniques.join(", ") + ")", "tool"));
  }
  head.appendChild(hr);
  // fixed layout needs a definite width: 14em for the names, 7em per tool (app.css)
  table.style.width = (14 + 7 * tools.length) + "em";
  table.replaceChildren(head, el("tbody"));
  showMore();
  status(); // also when there is nothing to show
  document.body.dataset.renderMs = String(Math.round(performance.now() - t0));
  document.body.dataset.ready = "1";
}

function cellAt(td) {
  const tr = td.parentElement;
  const d = Number(tr.dataset.device);
  const t = view.tools[td.cellIndex - 1];
  return { d, t, c: data.cells[grid[d * data.tools.length + t]] };
}

async function drill(td) {
  const { d, t } = cellAt(td);
  const device = data.devices[d];
  const tool = data.tools[t].Tool;
  const days = document.getElementById("f-days").value;
  const url = "/api/v1/matrix/cell?device=" + encodeURIComponent(device.DeviceId) +
    "&tool=" + encodeURIComponent(tool) + "&days=" + encodeURIComponent(days);
  const cell = await getJson(url);
  document.getElementById("drill-title").textContent = tool + " on " + device.DeviceName;
  const tbody = document.querySelector("#files tbody");
  const rows = cell.files.map(file => {
    const tr = el("tr");
    for (const v of [file.FolderPath, file.SHA256, file.Signer, file.Trust, shortTime(file.FirstSeen),
                     shortTime(file.LastSeen), file.Running ? "yes" : "no"]) tr.appendChild(el("td", v));
    return tr;
  });
  tbody.replaceChildren(...rows);
  document.getElementById("drill").hidden = false;
}

async function load() {
  const days = document.getElementById("f-days").value;
  document.body.dataset.ready = "";
  const t0 = performance.now();
  data = await getJson("/api/v1/matrix?days=" + encodeURIComponent(days));
  document.body.dataset.fetchMs = String(Math.round(performance.now() - t0));
  index();
  const select = document.getElementById("f-technique");
  const current = select.value;
  const techniques = [...new Set(data.tools.flatMap(t => t.Techniques))].sort();
  select.replaceChildren(el("option", "any"), ...techniques.map(x => el("option", x)));
  select.options[0].value = "";
  select.value = techniques.includes(current) ? current : "";
  render();
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("matrix");
  table.addEventListener("click", event => {
    const td = event.target.closest("td.hit");
    if (td) drill(td);
  });
  table.addEventListener("mouseover", event => {
    const td = event.target.closest("td.hit");
    if (!td || td.title) return;
    const { c } = cellAt(td);
    td.title = "FirstSeen " + shortTime(c[2]) + "\nLastSeen " + shortTime(c[3]) + "\nCount " + c[4] +
      (c[5] ? "\nrunning" : "") + (c[6] ? "\nuntrusted signature" : "");
  });
  const more = document.getElementById("more");
  more.addEventListener("click", showMore);
  observer = new IntersectionObserver(entries => {
    if (!entries.some(e => e.isIntersecting)) return;
    showMore();
    // observing again reports the state now: more pages while the button stays in view, even
    // when the rows added and a scroll back to the bottom fell between two observations
    observer.unobserve(more);
    observer.observe(more);
  }, { root: document.getElementById("matrix-wrap"), rootMargin: "200px" });
  observer.observe(more);
  for (const id of ["f-tool", "f-device", "f-technique"]) {
    document.getElementById(id).addEventListener("input", () => data && render());
  }
  document.getElementById("f-days").addEventListener("change", load);
  load();
});
