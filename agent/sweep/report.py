"""report.html: one self-contained page that opens offline (pure: records in, text out).

Every value is HTML-escaped where it is written (``html.escape`` with quotes), the page holds
no data inside its script (the script only sorts and filters the rendered table), and a
Content-Security-Policy forbids every external request, so a hostile file or signer name can
neither inject markup nor make the page fetch anything.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from agent.textenc import display

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; form-action 'none'"

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d232a;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dee4;padding-bottom:4px}
.sub{color:#57606a;margin-bottom:16px}
table{border-collapse:collapse;width:100%;background:#fff;margin-bottom:8px}
th,td{border:1px solid #d8dee4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#8c959f}
td.mono,span.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.bad{color:#b42318;font-weight:600}.good{color:#1a7f37;font-weight:600}.muted{color:#57606a}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:20px}
input[type=search]{width:360px;padding:5px 8px;margin:4px 0 8px;border:1px solid #afb8c1;border-radius:4px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px;
background:#fff;border:1px solid #d8dee4;padding:8px 12px}
dt{color:#57606a}dd{margin:0}
"""

SCRIPT = """
(function(){
  function key(td){var t=td?td.textContent.trim():"";var n=Number(t);
    return t!==""&&!isNaN(n)?[0,n]:[1,t.toLowerCase()];}
  document.querySelectorAll("table.sortable").forEach(function(table){
    table.querySelectorAll("th").forEach(function(th,i){
      th.addEventListener("click",function(){
        var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
        var dir=th.getAttribute("data-dir")==="asc"?-1:1;
        table.querySelectorAll("th").forEach(function(h){h.removeAttribute("data-dir");});
        th.setAttribute("data-dir",dir===1?"asc":"desc");
        rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
          if(x[0]!==y[0])return (x[0]-y[0])*dir;return (x[1]<y[1]?-1:x[1]>y[1]?1:0)*dir;});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
  document.querySelectorAll("input[data-filter]").forEach(function(input){
    var table=document.getElementById(input.getAttribute("data-filter"));
    input.addEventListener("input",function(){
      var q=input.value.toLowerCase();var shown=0;
      Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
        var hit=r.textContent.toLowerCase().indexOf(q)>=0;r.style.display=hit?"":"none";if(hit)shown++;});
      var c=document.getElementById(input.getAttribute("data-count"));if(c)c.textContent=String(shown);
    });
  });
})();
"""


def esc(value: Any) -> str:
    """Untrusted text for HTML: the terminal-safe escape first (controls, bidi overrides,
    undecodable bytes shown as %XX), then HTML escaping with quotes."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(esc(v) for v in value)
    return html.escape(display(str(value)), quote=True)


def esc_path(value: Any) -> str:
    """A path already in the percent escape of agent/textenc: only HTML escaping is left."""
    return html.escape(str(value or ""), quote=True)


def _table(
    table_id: str, headers: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]], *, sortable: bool = True
) -> str:
    """rows: cells of (already escaped html, css class)."""
    cls = ' class="sortable"' if sortable else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for v, c in row) + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _filter(table_id: str, count: int, label: str) -> str:
    return (
        f'<input type="search" placeholder="filter {html.escape(label)}..." data-filter="{table_id}" '
        f'data-count="{table_id}-count" aria-label="filter {html.escape(label)}"> '
        f'<span class="muted"><span id="{table_id}-count">{count}</span> shown</span>'
    )


def _trust_cell(f: Mapping[str, Any]) -> tuple[str, str]:
    return esc(f["Trust"]), "good" if f["IsTrusted"] else "bad"


def render_report(
    *,
    tools: Sequence[Mapping[str, Any]],
    files: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    errors: Sequence[Mapping[str, Any]],
    stats: Mapping[str, Any],
    manifest: Mapping[str, Any],
) -> str:
    device = manifest.get("Device", {})
    source = manifest.get("Source", {})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>rmmhunt sweep: {esc(device.get('DeviceName'))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>rmmhunt sweep of {esc(device.get('DeviceName'))}</h1>",
        f'<div class="sub">DeviceId <span class="mono">{esc(device.get("DeviceId"))}</span> &middot; '
        f"source {esc_path(source.get('Path'))} ({esc(source.get('ImageType'))}) &middot; "
        f"{esc(manifest.get('Started'))} to {esc(manifest.get('Ended'))}</div>",
    ]
    statuses = stats.get("statuses", {})
    cards = [
        ("tools found", len([t for t in tools if t["Tool"] != "(unattributed)"])),
        ("files found", len(files)),
        ("files swept", stats.get("files", 0)),
        ("signed files", stats.get("signed_files", 0)),
        ("errors", stats.get("errors_total", 0)),
        ("seconds", stats.get("elapsed_seconds", 0)),
    ]
    parts.append(
        '<div class="cards">' + "".join(f'<div class="card"><b>{esc(v)}</b>{esc(k)}</div>' for k, v in cards) + "</div>"
    )

    parts.append("<h2>Findings by tool</h2>")
    if tools:
        parts.append(
            _table(
                "tools",
                ("Tool", "Technique", "Files", "Trusted", "Untrusted", "Running", "Signers"),
                [
                    [
                        (esc(t["Tool"]), ""),
                        (esc(t["Techniques"]), ""),
                        (esc(t["Files"]), ""),
                        (esc(t["Trusted"]), "good" if t["Trusted"] else ""),
                        (esc(t["Untrusted"]), "bad" if t["Untrusted"] else ""),
                        (esc("no (offline sweep)") if not t["Running"] else esc(t["Running"]), "muted"),
                        (esc(t["Signers"]), ""),
                    ]
                    for t in tools
                ],
            )
        )
    else:
        parts.append('<p class="good">No RMM tool found.</p>')

    parts.append("<h2>Files found</h2>")
    parts.append(_filter("files", len(files), "files"))
    parts.append(
        _table(
            "files",
            ("Tool", "Technique", "Signer", "Trust", "Signing time", "Running", "Path", "SHA256", "Rules"),
            [
                [
                    (esc(f["Tools"]), ""),
                    (esc(f["Techniques"]), ""),
                    (esc(f["Signer"]), ""),
                    _trust_cell(f),
                    (esc(f["SigningTime"]), "mono"),
                    (esc(f["Running"]), "muted"),
                    (esc_path(f["FolderPath"]), "mono"),
                    (esc(f["SHA256"]), "mono"),
                    (esc(f["RuleNames"]), ""),
                ]
                for f in files
            ],
        )
    )

    parts.append("<h2>Rule results (published shape)</h2>")
    parts.append(
        _table(
            "results",
            ("Rule", "Tool", "DeviceName", "FirstSeen", "LastSeen", "Count"),
            [
                [
                    (esc(r.get("RuleName")), ""),
                    (esc(r.get("Tool")), ""),
                    (esc(r.get("DeviceName")), ""),
                    (esc(r.get("FirstSeen")), "mono"),
                    (esc(r.get("LastSeen")), "mono"),
                    (esc(r.get("Count")), ""),
                ]
                for r in results
            ],
        )
    )

    parts.append("<h2>Errors</h2>")
    parts.append(
        '<p class="muted">Files swept per status: '
        + esc(", ".join(f"{k} {v}" for k, v in statuses.items() if v) or "none")
        + "</p>"
    )
    if errors:
        parts.append(_filter("errors", len(errors), "errors"))
        parts.append(
            _table(
                "errors",
                ("Status", "Path", "Detail"),
                [
                    [(esc(e.get("status")), "bad"), (esc_path(e.get("path")), "mono"), (esc(e.get("detail")), "")]
                    for e in errors
                ],
            )
        )
    else:
        parts.append('<p class="good">No errors.</p>')

    operator = manifest.get("Operator", {})
    tool = manifest.get("Tool", {})
    items = [
        ("Tool", f"{tool.get('Name', '')} {tool.get('Version', '')}"),
        ("Source", source.get("Path")),
        ("Source type", source.get("ImageType")),
        ("Source size", source.get("Size")),
        ("Source SHA-256", source.get("SHA256")),
        ("Volumes", ", ".join(f"{v.get('path_prefix')} ({v.get('filesystem')})" for v in source.get("Volumes", []))),
        ("DeviceName", f"{device.get('DeviceName', '')}  [{device.get('DeviceNameSource', '')}]"),
        ("DeviceId", f"{device.get('DeviceId', '')}  [{device.get('DeviceIdSource', '')}]"),
        ("Started", manifest.get("Started")),
        ("Ended", manifest.get("Ended")),
        ("Operator", f"{operator.get('User', '')} on {operator.get('Host', '')}"),
        ("Rules", f"{len(manifest.get('Rules', []))} rules (SHA-256 of each in stats.json and manifest.json)"),
    ]
    parts.append("<h2>Manifest</h2><dl>")
    pre_escaped = {"Source"}  # the manifest holds the source path in the percent escape already
    parts.extend(
        f"<dt>{esc(k)}</dt><dd>{esc_path(v) if k in pre_escaped else esc(v)}</dd>"
        for k, v in items
        if v not in (None, "")
    )
    parts.append(
        '</dl><p class="muted">The SHA-256 of every member, this page included, is in manifest.json; '
        "check it with <span class=mono>rmmhunt sweep --verify BUNDLE.zip</span>.</p>"
    )
    parts.append(f"<script>{SCRIPT}</script></body></html>\n")
    return "\n".join(parts)
