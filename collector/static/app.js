// rmmhunt dashboard: every value goes into the page with textContent, never as HTML.
"use strict";

let data = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function shortDay(iso) {
  return iso ? iso.slice(5, 10) : "";
}

function shortTime(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
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

function render() {
  const t0 = performance.now();
  const f = filters();
  const tools = data.tools.filter(t =>
    (!f.tool || t.Tool.toLowerCase().includes(f.tool)) && (!f.technique || t.Techniques.includes(f.technique)));
  const cellsByDevice = new Map();
  for (const [d, t, first, last, count, running, untrusted] of data.cells) {
    const deviceId = data.devices[d].DeviceId;
    if (!cellsByDevice.has(deviceId)) cellsByDevice.set(deviceId, new Map());
    cellsByDevice.get(deviceId).set(data.tools[t].Tool,
      { FirstSeen: first, LastSeen: last, Count: count, Running: running, Untrusted: untrusted });
  }
  const toolNames = new Set(tools.map(t => t.Tool));
  const devices = data.devices.filter(d => {
    if (f.device && !d.DeviceName.toLowerCase().includes(f.device) && !d.DeviceId.includes(f.device)) return false;
    const row = cellsByDevice.get(d.DeviceId);
    return row && [...row.keys()].some(t => toolNames.has(t));
  });
  const table = document.getElementById("matrix");
  const head = el("thead");
  const hr = el("tr");
  hr.appendChild(el("th", "Device"));
  for (const t of tools) hr.appendChild(el("th", t.Tool + " (" + t.Techniques.join(", ") + ")", "tool"));
  head.appendChild(hr);
  const body = el("tbody");
  for (const d of devices) {
    const tr = el("tr");
    const name = el("th", d.DeviceName + (d.DroppedRows ? " (" + d.DroppedRows + " rows dropped by its outbox)" : ""));
    name.title = d.DeviceId;
    tr.appendChild(name);
    const row = cellsByDevice.get(d.DeviceId);
    for (const t of tools) {
      const c = row.get(t.Tool);
      if (!c) { tr.appendChild(el("td", "")); continue; }
      let cls = "hit";
      if (c.Running) cls += " running";
      if (c.Untrusted) cls += " untrusted";
      const td = el("td", null, cls);
      td.appendChild(el("b", String(c.Count) + (c.Running ? " R" : "") + (c.Untrusted ? " !" : "")));
      td.appendChild(el("small", shortDay(c.FirstSeen) + "→" + shortDay(c.LastSeen)));
      td.title = "FirstSeen " + shortTime(c.FirstSeen) + "\nLastSeen " + shortTime(c.LastSeen) + "\nCount " + c.Count;
      td.dataset.device = d.DeviceId;
      td.dataset.tool = t.Tool;
      td.dataset.deviceName = d.DeviceName;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  table.replaceChildren(head, body);
  document.getElementById("status").textContent =
    devices.length + " devices, " + tools.length + " tools, rule set " + data.ruleset_version;
  document.body.dataset.renderMs = String(Math.round(performance.now() - t0));
  document.body.dataset.ready = "1";
}

async function drill(td) {
  const days = document.getElementById("f-days").value;
  const url = "/api/v1/matrix/cell?device=" + encodeURIComponent(td.dataset.device) +
    "&tool=" + encodeURIComponent(td.dataset.tool) + "&days=" + encodeURIComponent(days);
  const cell = await getJson(url);
  document.getElementById("drill-title").textContent = td.dataset.tool + " on " + td.dataset.deviceName;
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
  const select = document.getElementById("f-technique");
  const current = select.value;
  const techniques = [...new Set(data.tools.flatMap(t => t.Techniques))].sort();
  select.replaceChildren(el("option", "any"), ...techniques.map(x => el("option", x)));
  select.options[0].value = "";
  select.value = techniques.includes(current) ? current : "";
  render();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("matrix").addEventListener("click", event => {
    const td = event.target.closest("td.hit");
    if (td) drill(td);
  });
  for (const id of ["f-tool", "f-device", "f-technique"]) {
    document.getElementById(id).addEventListener("input", () => data && render());
  }
  document.getElementById("f-days").addEventListener("change", load);
  load();
});
