// Opens a function's <details> when a link targets it, and builds its side-by-side rows from its
// inline JSON only then: a page with thousands of changed functions loads without drawing them.
(function () {
  "use strict";
  // each function's rows sit in their own JSON script element: opening one parses only its own
  function data(id) {
    const node = document.getElementById("rows-" + id);
    return node ? JSON.parse(node.textContent) : null;
  }
  function cell(row, side, value) {
    const off = document.createElement("td");
    off.className = "off";
    const asm = document.createElement("td");
    asm.className = "asm " + side;
    if (value) {
      off.textContent = value[0];
      for (const token of value[1]) {
        const href = token[2];
        const span = document.createElement(href ? "a" : "span");
        span.className = token[0];
        span.textContent = token[1];
        if (href) span.href = href;
        asm.appendChild(span);
      }
    }
    row.appendChild(off);
    row.appendChild(asm);
  }
  function render(element) {
    if (!element || element.dataset.rendered) return;
    element.dataset.rendered = "1";
    const body = element.querySelector(".body");
    const entry = data(element.id);
    if (!body || !entry) return;
    const table = document.createElement("table");
    table.className = "sbs";
    const head = table.insertRow();
    for (const text of ["", "baseline", "", "patched"]) {
      const th = document.createElement("th");
      th.textContent = text;
      th.className = text ? "asm" : "off";
      head.appendChild(th);
    }
    for (const [state, left, right] of entry.rows) {
      const row = table.insertRow();
      if (typeof state === "number") {
        // a run of unchanged rows left out around the changes
        row.className = "gap";
        const td = row.insertCell();
        td.colSpan = 4;
        td.textContent = "\u22ef " + state + " unchanged rows";
        continue;
      }
      row.className = state;
      cell(row, "left", left);
      cell(row, "right", right);
    }
    const wrap = document.createElement("div");
    wrap.className = "sbs-wrap asm";
    wrap.appendChild(table);
    body.appendChild(wrap);
    if (entry.total > entry.shown) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = (entry.total - entry.shown) + " more rows not shown";
      body.appendChild(note);
    }
  }
  function openTarget() {
    const id = decodeURIComponent(location.hash.slice(1));
    const element = id && document.getElementById(id);
    if (!element) return;
    if (element.tagName === "DETAILS") {
      element.open = true;
      render(element);
    }
    element.scrollIntoView({block: "start"});
  }
  document.addEventListener("toggle", function (event) {
    if (event.target.tagName === "DETAILS" && event.target.open) render(event.target);
  }, true);
  window.addEventListener("hashchange", openTarget);
  document.addEventListener("DOMContentLoaded", function () {
    openTarget();
    document.body.dataset.ready = "1";
  });
})();
