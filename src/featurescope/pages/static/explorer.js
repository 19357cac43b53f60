// The featurescope explorer: vanilla JS over the JSON in <script id="fs-data">. No network.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("fs-data").textContent);
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                   "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const colour = (i) => PALETTE[((i % PALETTE.length) + PALETTE.length) % PALETTE.length];
  const className = (label) => (label >= 0 && label < D.classes.length ? D.classes[label] : "");
  // An image's name: its file (below the folder's root), with its class folder where it has one.
  const named = (item) => {
    const cls = className(item.label);
    return cls ? `${item.name} (${cls})` : item.name;
  };
  // A units-only page carries no search: every section draws only what its data has.
  for (const key of ["runs", "queries", "gallery", "stages", "similarity", "classes"]) D[key] = D[key] || [];
  const gallery = new Map(D.gallery.map((g) => [g.id, g]));
  const picture = (index) => (index === null || index === undefined ? null : D.images[index]);

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  function decode(b64) {
    const raw = atob(b64);
    const out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }
  // Maps travel zlib-compressed; the browser inflates them itself (no library, no network).
  async function inflate(b64) {
    const stream = new Blob([decode(b64)]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // --- colour maps: viridis-like for maps, jet-like for overlays --------------------------
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const JET = [[0, 0, 143], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]];
  function cmap(stops, v) {
    const x = (v / 255) * (stops.length - 1);
    const i = Math.min(Math.floor(x), stops.length - 2);
    const t = x - i;
    return stops[i].map((c, j) => Math.round(c + t * (stops[i + 1][j] - c)));
  }
  function mapCanvas(values, w, h, stops, alpha) {
    const c = el("canvas", { width: w, height: h });
    const ctx = c.getContext("2d");
    const img = ctx.createImageData(w, h);
    for (let p = 0; p < w * h; p++) {
      const [r, g, b] = cmap(stops, values[p]);
      img.data.set([r, g, b, alpha], 4 * p);
    }
    ctx.putImageData(img, 0, 0);
    return c;
  }
  function drawScaled(target, source, alpha) {
    const ctx = target.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.globalAlpha = alpha === undefined ? 1 : alpha;
    ctx.drawImage(source, 0, 0, target.width, target.height);
    ctx.globalAlpha = 1;
  }

  // --- training curves --------------------------------------------------------------------
  const hidden = new Set();
  function chart(host, title, series, yLabel) {
    const W = 460, H = 260, L = 48, R = 12, T = 24, B = 36;
    const s = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "fs-chart" });
    const all = [];
    D.runs.forEach((run) => series.forEach(([key]) => (run[key] || []).forEach((v) => all.push(v))));
    if (!all.length) return;
    const epochs = Math.max(...D.runs.map((r) => r.train_loss.length));
    const lo = Math.min(...all), hi = Math.max(...all);
    const pad = (hi - lo) * 0.05 || 0.05;
    const y0 = lo - pad, y1 = hi + pad;
    const X = (e) => L + ((e - 1) / Math.max(epochs - 1, 1)) * (W - L - R);
    const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
    s.appendChild(svg("text", { x: W / 2, y: 16, "text-anchor": "middle", class: "fs-title" }))
      .textContent = title;
    for (let i = 0; i <= 4; i++) {
      const v = y0 + (i / 4) * (y1 - y0);
      s.appendChild(svg("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "fs-grid" }));
      s.appendChild(svg("text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end", class: "fs-tick" }))
        .textContent = v.toFixed(2);
    }
    for (let e = 1; e <= epochs; e++) {
      s.appendChild(svg("text", { x: X(e), y: H - B + 14, "text-anchor": "middle", class: "fs-tick" }))
        .textContent = e;
    }
    s.appendChild(svg("text", { x: W / 2, y: H - 4, "text-anchor": "middle", class: "fs-tick" }))
      .textContent = "epoch";
    s.appendChild(svg("text", { x: 10, y: T - 8, class: "fs-tick" })).textContent = yLabel;
    D.runs.forEach((run, r) => {
      const g = svg("g", { "data-fs-run": run.name, class: "fs-series" });
      series.forEach(([key, dash]) => {
        const values = run[key] || [];
        if (!values.length) return;
        const pts = values.map((v, i) => `${X(i + 1)},${Y(v)}`).join(" ");
        g.appendChild(svg("polyline", { points: pts, fill: "none", stroke: colour(r),
                                        "stroke-width": 2, "stroke-dasharray": dash }));
        values.forEach((v, i) => {
          const dot = svg("circle", { cx: X(i + 1), cy: Y(v), r: 4, fill: colour(r), class: "fs-dot" });
          const tip = svg("title");
          tip.textContent = `${run.name}, epoch ${i + 1}: ${key.replace("_", " ")} ${v.toFixed(4)}`;
          dot.appendChild(tip);
          g.appendChild(dot);
        });
      });
      s.appendChild(g);
    });
    host.appendChild(s);
  }
  function applyHidden() {
    document.querySelectorAll("[data-fs-run]").forEach((node) => {
      const off = hidden.has(node.getAttribute("data-fs-run"));
      if (node.tagName.toLowerCase() === "g") node.style.display = off ? "none" : "";
      else node.classList.toggle("fs-off", off);
    });
  }
  function curves() {
    const host = $("fs-curves");
    if (!host) return;
    const legend = el("div", { class: "fs-legend" });
    D.runs.forEach((run, r) => {
      const item = el("button", { type: "button", "data-fs-run": run.name, class: "fs-run",
                                  title: "click to hide or show this run" });
      item.appendChild(el("span", { class: "fs-swatch", style: `background:${colour(r)}` }));
      item.appendChild(document.createTextNode(run.name));
      item.addEventListener("click", () => {
        if (hidden.has(run.name)) hidden.delete(run.name);
        else hidden.add(run.name);
        applyHidden();
      });
      legend.appendChild(item);
    });
    host.appendChild(legend);
    host.appendChild(el("p", { class: "fs-note",
      text: "solid: training, dashed: validation; hover a point for its value" }));
    const row = el("div", { class: "fs-row" });
    host.appendChild(row);
    chart(row, "loss", [["train_loss", ""], ["val_loss", "5 4"]], "cross-entropy");
    chart(row, "accuracy", [["train_acc", ""], ["val_acc", "5 4"]], "accuracy");
  }

  // --- feature maps -----------------------------------------------------------------------
  const fm = { query: 0, stage: 0, channel: null };
  function stageOf(i) { return D.stages[i]; }
  async function unpacked(entry) {
    if (!entry._data) [entry._data, entry._sum] = await Promise.all([inflate(entry.data), inflate(entry.sum)]);
    return entry;
  }
  function drawOver(canvas, imageIndex, values, w, h) {
    const size = canvas.width;
    const ctx = canvas.getContext("2d");
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => {
        ctx.clearRect(0, 0, size, size);
        drawScaled(canvas, img);
        drawScaled(canvas, mapCanvas(values, w, h, JET, 255), 0.5);
        resolve();
      };
      img.src = picture(imageIndex);
    });
  }
  async function drawMaps() {
    const stage = stageOf(fm.stage);
    const entry = await unpacked(stage.maps[fm.query]);
    const [shown, h, w] = stage.shipped;
    if (fm.channel === null) fm.channel = 0;  // a position in entry.order: the strongest first
    const c = entry.order[fm.channel];
    const channel = entry._data.subarray(fm.channel * h * w, (fm.channel + 1) * h * w);
    const targets = { "fs-map-channel": channel, "fs-map-sum": entry._sum };
    for (const [id, values] of Object.entries(targets)) {
      const canvas = $(id);
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
      drawScaled(canvas, mapCanvas(values, w, h, VIRIDIS, 255));
    }
    const q = D.queries[fm.query];
    await drawOver($("fs-map-overlay"), q.image, channel, w, h);
    await drawOver($("fs-map-sum-overlay"), q.image, entry._sum, w, h);
    const [C, H, W] = stage.shape;
    const strongest = shown < C ? ` (the ${shown} strongest shown)` : "";
    $("fs-map-caption").textContent =
      `${stage.label}, node ${stage.name}: channel ${c} of ${C}${strongest} ` +
      `(mean ${entry.means[fm.channel].toFixed(3)}), ${H}×${W}; ${named(q)}`;
    document.querySelectorAll("[data-fs-channel]").forEach((b) =>
      b.classList.toggle("fs-selected", b.getAttribute("data-fs-channel") === `${stage.name}:${c}`));
    document.body.setAttribute("data-fs-drawn", `${fm.query}:${stage.name}:${c}`);
  }
  // Every carried channel as a small map: a grid of tiles to choose from, as the study drew them.
  async function channelTiles() {
    const stage = stageOf(fm.stage);
    const entry = await unpacked(stage.maps[fm.query]);
    const [, h, w] = stage.shipped;
    const list = $("fs-channels");
    list.textContent = "";
    entry.order.forEach((c, position) => {
      const tile = mapCanvas(entry._data.subarray(position * h * w, (position + 1) * h * w), w, h, VIRIDIS, 255);
      tile.className = "fs-chan";
      tile.setAttribute("data-fs-channel", `${stage.name}:${c}`);
      tile.setAttribute("role", "button");
      tile.title = `channel ${c}: mean activation ${entry.means[position].toFixed(4)}`;
      tile.addEventListener("click", () => { fm.channel = position; drawMaps(); });
      list.appendChild(tile);
    });
  }
  async function redrawMaps() { await channelTiles(); await drawMaps(); }
  function maps() {
    if (!$("fs-maps") || !D.stages.length) return Promise.resolve();
    const stageSel = $("fs-stage"), imageSel = $("fs-map-image");
    D.stages.forEach((s, i) => stageSel.appendChild(el("option", {
      value: i, title: `node ${s.name}, [${s.shape.join(", ")}]`, text: `${s.label} · ${s.name}` })));
    D.stages[0].maps.forEach((_, i) => imageSel.appendChild(el("option", { value: i, text: `${i + 1}: ${named(D.queries[i])}` })));
    stageSel.addEventListener("change", () => { fm.stage = +stageSel.value; fm.channel = null; redrawMaps(); });
    imageSel.addEventListener("change", () => { fm.query = +imageSel.value; fm.channel = null; redrawMaps(); });
    return redrawMaps();
  }

  // --- search by image --------------------------------------------------------------------
  function tileImage(g) {
    const src = picture(g.image);
    if (src) return el("img", { src: src, alt: g.name });
    return el("div", { class: "fs-missing", text: "missing", title: `${g.path}: file not found` });
  }
  function neighbourTiles(host, hits, queryLabel) {
    host.textContent = "";
    hits.forEach(([id, dist], rank) => {
      const g = gallery.get(id);
      const hit = queryLabel >= 0 && g.label === queryLabel;
      const fig = el("figure", { class: "fs-tile " + (queryLabel < 0 ? "" : hit ? "fs-hit" : "fs-miss"),
                                 "data-fs-neighbour": String(id), title: g.path });
      fig.appendChild(tileImage(g));
      const cls = className(g.label);
      fig.appendChild(el("figcaption", {
        text: `${rank + 1}. ${g.name}${cls ? " · " + cls : ""} ${dist.toFixed(3)}${hit ? " ✓" : ""}` }));
      host.appendChild(fig);
    });
  }
  function drawCam(q) {
    const cam = $("fs-gradcam");
    if (!cam) return Promise.resolve();
    if (!q.cam) {
      cam.style.display = "none";
      $("fs-gradcam-caption").textContent = "";
      return Promise.resolve();
    }
    cam.style.display = "";
    $("fs-gradcam-caption").textContent = `${q.predicted_name} (node ${D.cam_node})`;
    return inflate(q.cam).then((values) => drawOver(cam, q.image, values, D.cam_side, D.cam_side));
  }
  function selectQuery(i) {
    const q = D.queries[i];
    document.querySelectorAll("[data-fs-query]").forEach((n) =>
      n.classList.toggle("fs-selected", n.getAttribute("data-fs-query") === String(i)));
    $("fs-query-caption").textContent =
      `${D.wording.query} ${i + 1}: ${named(q)}` +
      (q.predicted_name !== null ? `, predicted ${q.predicted_name}` : "");
    $("fs-query-caption").title = q.path;
    neighbourTiles($("fs-search-results"), q.neighbours, q.label);
    return drawCam(q);
  }
  function search() {
    const host = $("fs-queries");
    if (!host) return Promise.resolve();
    D.queries.forEach((q, i) => {
      const img = el("img", { src: picture(q.image), alt: q.name, title: `${named(q)} — ${q.path}`,
                              class: "fs-query", "data-fs-query": String(i) });
      img.addEventListener("click", () => selectQuery(i));
      host.appendChild(img);
    });
    return D.queries.length ? selectQuery(0) : Promise.resolve();
  }

  // --- projection -------------------------------------------------------------------------
  function projection() {
    const host = $("fs-projection");
    if (!host || !D.projection) return;
    const W = 520, H = 420, P = 16;
    const pts = D.projection.points;
    const xs = pts.map((p) => p[1]), ys = pts.map((p) => p[2]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const X = (x) => P + ((x - x0) / ((x1 - x0) || 1)) * (W - 2 * P);
    const Y = (y) => H - P - ((y - y0) / ((y1 - y0) || 1)) * (H - 2 * P);
    const s = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "fs-scatter" });
    pts.forEach(([id, x, y]) => {
      const g = gallery.get(id);
      const dot = svg("circle", { cx: X(x), cy: Y(y), r: 5, fill: colour(g.label), "data-fs-point": String(id) });
      const tip = svg("title");
      tip.textContent = named(g);
      dot.appendChild(tip);
      dot.addEventListener("click", () => {
        s.querySelectorAll(".fs-picked").forEach((n) => n.classList.remove("fs-picked"));
        dot.classList.add("fs-picked");
        const src = picture(g.image);
        $("fs-point-image").style.display = src ? "" : "none";
        if (src) $("fs-point-image").src = src;
        $("fs-point-caption").textContent = `${named(g)}${src ? "" : " (file missing)"} — ${g.path}`;
        neighbourTiles($("fs-point-neighbours"), D.projection.neighbours[String(id)] || [], g.label);
      });
      s.appendChild(dot);
    });
    host.appendChild(s);
    const legend = el("div", { class: "fs-legend" });
    D.classes.forEach((c, i) => {
      const item = el("span", { class: "fs-run" });
      item.appendChild(el("span", { class: "fs-swatch", style: `background:${colour(i)}` }));
      item.appendChild(document.createTextNode(c));
      legend.appendChild(item);
    });
    host.appendChild(legend);
  }

  // --- representation similarity (linear CKA) ------------------------------------------
  function similarity() {
    const host = $("fs-similarity");
    if (!host) return;
    (D.similarity || []).forEach((t) => {
      const box = el("div", { class: "fs-similarity" });
      box.appendChild(el("h3", { text: t.name }));
      const table = el("table", { class: "fs-cka" });
      const head = el("tr", {}, [el("th", { text: `${t.model_a} \u2193 / ${t.model_b} \u2192` })]);
      t.nodes_b.forEach((b) => head.appendChild(el("th", { text: b })));
      table.appendChild(head);
      t.matrix.forEach((row, i) => {
        const tr = el("tr", {}, [el("th", { text: t.nodes_a[i] })]);
        row.forEach((v, j) => {
          const est = t.estimators ? t.estimators[i][j] : "";
          const shown = v === null ? "n/a" : v.toFixed(2);
          const [r, g, b] = cmap(VIRIDIS, v === null ? 0 : Math.max(0, Math.min(1, v)) * 255);
          const ink = v !== null && v > 0.6 ? "#000" : "#fff";
          const cell = el("td", {
            text: shown,
            style: `background:rgb(${r},${g},${b});color:${ink}`,
            title: `${t.nodes_a[i]} \u00d7 ${t.nodes_b[j]}: CKA ${v === null ? "undefined (constant features)" : v.toFixed(4)}${est ? ` (${est})` : ""}`,
            "data-fs-cka": `${i},${j}`,
          });
          tr.appendChild(cell);
        });
        table.appendChild(tr);
      });
      box.appendChild(table);
      host.appendChild(box);
    });
  }

  // --- units: what each channel responds to ---------------------------------------------
  const un = { stage: 0 };
  function picturedOrBlank(index, alt) {
    const src = picture(index);
    return src ? el("img", { src: src, alt: alt }) : el("div", { class: "fs-absent", title: "not computed" });
  }
  async function drawUnit(stage, unit) {
    const U = D.units;
    document.querySelectorAll("[data-fs-unit]").forEach((t) =>
      t.classList.toggle("fs-selected", t.getAttribute("data-fs-unit") === `${stage.name}:${unit.channel}`));
    const field = stage.field ? `receptive field ${stage.field[0]}×${stage.field[1]} px` : "a global field";
    $("fs-unit-caption").textContent =
      `${stage.label}, node ${stage.name}: channel ${unit.channel} of ${stage.channels}, ` +
      `its ${unit.top.length} strongest (${field}); each row: patch, deconvnet, guided ` +
      "backprop, the image and the channel's map over it";
    const host = $("fs-unit-examples");
    host.textContent = "";
    const [h, w] = stage.shipped;
    for (const [rank, ex] of unit.top.entries()) {
      const source = U.sources[ex.source];
      const row = el("div", { class: "fs-unit-example", "data-fs-unit-example": String(rank),
                              "data-fs-unit-source": source.name });
      row.appendChild(picturedOrBlank(ex.patch, "patch"));
      row.appendChild(picturedOrBlank(ex.deconvnet, "deconvnet projection"));
      row.appendChild(picturedOrBlank(ex.guided, "guided-backprop projection"));
      row.appendChild(el("img", { src: picture(source.image), alt: source.name }));
      const over = el("canvas", { width: 64, height: 64 });
      row.appendChild(over);
      const cls = className(source.label);
      row.appendChild(el("span", {
        text: `${rank + 1}. ${source.name}${cls ? " (" + cls + ")" : ""}: ${ex.value.toPrecision(4)} ` +
              `at (${ex.position.join(", ")})` }));
      host.appendChild(row);
      await drawOver(over, source.image, await inflate(ex.map), w, h);
    }
    document.body.setAttribute("data-fs-unit-drawn", `${stage.name}:${unit.channel}`);
  }
  function unitTiles() {
    const stage = D.units.stages[un.stage];
    const grid = $("fs-unit-grid");
    grid.textContent = "";
    stage.units.forEach((unit) => {
      const tile = el("img", { src: picture(unit.tile), class: "fs-unit", alt: `channel ${unit.channel}`,
                               title: `channel ${unit.channel}: strongest ${unit.top[0].value.toPrecision(4)}`,
                               "data-fs-unit": `${stage.name}:${unit.channel}`, role: "button" });
      tile.addEventListener("click", () => drawUnit(stage, unit));
      grid.appendChild(tile);
    });
    return stage.units.length ? drawUnit(stage, stage.units[0]) : Promise.resolve();
  }
  function units() {
    if (!$("fs-units") || !D.units) return Promise.resolve();
    const select = $("fs-unit-stage");
    D.units.stages.forEach((s, i) => select.appendChild(el("option", {
      value: i, text: `${s.label} · ${s.name} (${s.units.length < s.channels ? `strongest ${s.units.length} of ` : ""}${s.channels} channels)` })));
    select.addEventListener("change", () => { un.stage = +select.value; unitTiles(); });
    return unitTiles();
  }

  curves();
  similarity();
  projection();
  Promise.all([maps(), search(), units()]).then(() => document.body.setAttribute("data-fs-ready", "1"));
})();
