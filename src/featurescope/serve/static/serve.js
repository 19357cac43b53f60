// featurescope serve: the page's one script (served as a file: the CSP allows no inline script).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  let photo = null;        // the last query: {blob} or {path}
  let analysis = null;     // /api/analyse's answer for it
  let photoImage = null;   // the photo as the model saw it, decoded

  function status(text, error) {
    const node = $("fs-status");
    node.textContent = text;
    node.classList.toggle("fs-error", Boolean(error));
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function bytes(b64) {
    const raw = atob(b64);
    const out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }

  // A jet-like colour map for overlays: blue (0) through green to red (255).
  function jet(v) {
    const t = v / 255;
    const c = (x) => Math.round(255 * Math.max(0, Math.min(1, 1.5 - Math.abs(4 * t - x))));
    return [c(3), c(2), c(1)];
  }

  // Grey values onto a canvas at their own resolution (CSS scales it, pixelated).
  function drawGrey(canvas, values, h, w) {
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(w, h);
    for (let i = 0; i < h * w; i++) {
      const v = values[i];
      img.data[4 * i] = v; img.data[4 * i + 1] = v; img.data[4 * i + 2] = v; img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  // The photo, then ``values`` (h x w) stretched over it in colour.
  function drawOverlay(canvas, values, h, w) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (photoImage) ctx.drawImage(photoImage, 0, 0, canvas.width, canvas.height);
    const small = document.createElement("canvas");
    small.width = w; small.height = h;
    const sctx = small.getContext("2d");
    const img = sctx.createImageData(w, h);
    for (let i = 0; i < h * w; i++) {
      const [r, g, b] = jet(values[i]);
      img.data[4 * i] = r; img.data[4 * i + 1] = g; img.data[4 * i + 2] = b; img.data[4 * i + 3] = 255;
    }
    sctx.putImageData(img, 0, 0);
    ctx.globalAlpha = 0.5;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }

  async function api(url, options) {
    const response = await fetch(url, options);
    const kind = response.headers.get("content-type") || "";
    const answer = kind.startsWith("application/json") ? await response.json() : null;
    if (!response.ok) throw new Error((answer && answer.error) || response.status + " " + response.statusText);
    return answer;
  }

  function figure(hit) {
    const cls = "fs-tile" + (hit.hit === true ? " fs-hit" : hit.hit === false ? " fs-miss" : "");
    const caption = "#" + hit.rank + " · " + Number(hit.distance).toPrecision(4) +
      (hit.class ? " · " + hit.class : "") + "\n" + hit.name;
    const fig = el("figure", {class: cls, "data-fs-neighbour": String(hit.id), title: hit.name}, [
      el("img", {src: "/api/image/" + hit.id + "?size=160", alt: hit.name, loading: "lazy"}),
      el("figcaption", {text: caption}),
    ]);
    fig.addEventListener("click", () => showPoint(hit.id));
    return fig;
  }

  function request(kind) {
    const k = $("fs-k").value || body.dataset.fsK;
    const label = $("fs-label").value;
    const query = "?k=" + encodeURIComponent(k) + (label ? "&label=" + encodeURIComponent(label) : "");
    if (photo.path !== undefined) {
      return api("/api/" + kind + query, {method: "POST", headers: {"content-type": "application/json"},
        body: JSON.stringify({path: photo.path})});
    }
    return api("/api/" + kind + query, {method: "POST",
      headers: {"content-type": photo.blob.type || "application/octet-stream"}, body: photo.blob});
  }

  async function runQuery() {
    if (!photo) return;
    body.dataset.fsReady = "0";
    status("Searching…");
    try {
      const [found, insides] = await Promise.all([request("search"), request("analyse")]);
      analysis = insides;
      showNeighbours(found);
      await showInsides(insides);
      $("fs-result").hidden = false;
      status(found.neighbours.length + " nearest of the gallery's images.");
    } catch (err) {
      status(String(err.message || err), true);
    }
    body.dataset.fsReady = "1";
  }

  function showNeighbours(found) {
    const box = $("fs-search-results");
    box.replaceChildren(...found.neighbours.map(figure));
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("an image did not load"));
      img.src = src;
    });
  }

  async function showInsides(a) {
    photoImage = await loadImage(a.photo);
    $("fs-photo").src = a.photo;
    $("fs-predicted").textContent = a.predicted
      ? "predicted: " + a.predicted.name + " (" + (100 * a.predicted.probability).toFixed(1) + " %)"
      : "no class predicted";
    const cam = $("fs-cam");
    if (a.cam) {
      drawOverlay(cam, bytes(a.cam), a.cam_side, a.cam_side);
      $("fs-cam-caption").textContent = "Grad-CAM of the predicted class at " + a.cam_node;
    } else {
      cam.getContext("2d").clearRect(0, 0, cam.width, cam.height);
      $("fs-cam-caption").textContent = a.cam_note;
    }
    const stages = $("fs-stages");
    stages.replaceChildren();
    a.stages.forEach((stage, s) => {
      const [c, h, w] = stage.shipped;
      const tiles = bytes(stage.tiles);
      stage.values = tiles;
      const grid = el("div", {class: "fs-channel-grid"});
      for (let ch = 0; ch < c; ch++) {
        const tile = el("canvas", {class: "fs-chan", "data-fs-channel": s + ":" + ch,
          title: stage.name + " channel " + ch + " (mean " + stage.means[ch] + ")"});
        drawGrey(tile, tiles.subarray(ch * h * w, (ch + 1) * h * w), h, w);
        tile.addEventListener("click", () => openChannel(s, ch));
        grid.appendChild(tile);
      }
      stages.appendChild(el("div", {class: "fs-stage"}, [
        el("h3", {text: stage.label + ": " + stage.name + ", " + stage.shape[0] + " channels"}), grid]));
    });
    $("fs-channel-view").hidden = true;
    showUnits(a.units);
  }

  function openChannel(s, ch) {
    const stage = analysis.stages[s];
    const [, h, w] = stage.shipped;
    const values = stage.values.subarray(ch * h * w, (ch + 1) * h * w);
    drawGrey($("fs-channel-large"), values, h, w);
    drawGrey($("fs-channel-sum"), bytes(stage.sum), h, w);
    drawOverlay($("fs-channel-overlay"), values, h, w);
    const [lo, hi] = stage.ranges[ch];
    $("fs-channel-caption").textContent = stage.name + " channel " + ch + " (" + lo + " to " + hi + ")";
    for (const t of document.querySelectorAll(".fs-chan.fs-selected")) t.classList.remove("fs-selected");
    document.querySelector("[data-fs-channel='" + s + ":" + ch + "']").classList.add("fs-selected");
    $("fs-channel-view").hidden = false;
    body.dataset.fsDrawn = s + ":" + ch;
  }

  function showUnits(units) {
    const box = $("fs-units");
    box.replaceChildren();
    $("fs-units-section").hidden = !units.length;
    for (const node of units) {
      const rows = el("div", {class: "fs-unit-examples"});
      box.append(el("h3", {text: node.node}), rows);
      for (const unit of node.channels) {
        const row = el("div", {class: "fs-unit-example", "data-fs-unit": node.node + ":" + unit.channel}, [
          el("span", {text: "channel " + unit.channel + " (" + unit.value.toPrecision(3) + ")"})]);
        for (const top of unit.top) {
          const patch = el("canvas", {width: "64", height: "64", title: "gallery #" + top.id});
          row.appendChild(patch);
          loadImage("/api/image/" + top.id + "?view=model").then((img) => {
            const [t, l, b, r] = top.box || [0, 0, img.height, img.width];
            patch.getContext("2d").drawImage(img, l, t, r - l, b - t, 0, 0, 64, 64);
          }, () => {});
        }
        rows.appendChild(row);
      }
    }
  }

  // -- the gallery's map ------------------------------------------------------------------
  const map = {ids: null, xy: null, n: 0, view: null, cells: null, cell: 0, selected: -1};

  async function loadMap() {
    try {
      const meta = await api("/api/map");
      const raw = await (await fetch("/api/map.bin")).arrayBuffer();
      const n = new DataView(raw).getUint32(0, true);
      map.n = n;
      map.ids = new Int32Array(raw, 4, n);
      map.xy = new Float32Array(raw, 4 + 4 * n, 2 * n);
      $("fs-map-method").textContent = "(" + meta.method + ", " + n + " images)";
      fitView();
      buildCells();
      drawMap();
      body.dataset.fsMap = String(n);
    } catch (err) {
      $("fs-map-method").textContent = "(the map failed: " + err.message + ")";
    }
  }

  function fitView() {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < map.n; i++) {
      const x = map.xy[2 * i], y = map.xy[2 * i + 1];
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
    const canvas = $("fs-map");
    const span = Math.max(x1 - x0, y1 - y0) || 1;
    const scale = 0.92 * Math.min(canvas.width, canvas.height) / span;
    map.view = {scale, cx: (x0 + x1) / 2, cy: (y0 + y1) / 2};
    map.bounds = [x0, y0, span];
  }

  // A uniform grid over the data's bounds: picking looks only at the cells around the cursor.
  function buildCells() {
    const side = Math.max(1, Math.ceil(Math.sqrt(map.n / 4)));
    const [x0, y0, span] = map.bounds;
    map.cell = span / side; map.side = side;
    const counts = new Int32Array(side * side + 1);
    const key = new Int32Array(map.n);
    for (let i = 0; i < map.n; i++) {
      const cx = Math.min(side - 1, Math.floor((map.xy[2 * i] - x0) / map.cell));
      const cy = Math.min(side - 1, Math.floor((map.xy[2 * i + 1] - y0) / map.cell));
      key[i] = cy * side + cx; counts[key[i] + 1]++;
    }
    for (let c = 0; c < side * side; c++) counts[c + 1] += counts[c];
    const order = new Int32Array(map.n), fill = counts.slice();
    for (let i = 0; i < map.n; i++) order[fill[key[i]]++] = i;
    map.start = counts; map.order = order;
  }

  function toScreen(i) {
    const canvas = $("fs-map"), v = map.view;
    return [canvas.width / 2 + (map.xy[2 * i] - v.cx) * v.scale,
            canvas.height / 2 - (map.xy[2 * i + 1] - v.cy) * v.scale];
  }

  function drawMap() {
    const canvas = $("fs-map"), ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    const img = ctx.createImageData(w, h);
    const data = img.data;
    // Few points are drawn larger; many as 2x2 pixels written straight into one ImageData.
    const side = map.n < 5000 ? 4 : 2;
    const dots = [];
    for (let dy = 0; dy < side; dy++) for (let dx = 0; dx < side; dx++) dots.push(dy * w + dx);
    for (let i = 0; i < map.n; i++) {
      const [sx, sy] = toScreen(i);
      const x = Math.round(sx) - (side >> 1), y = Math.round(sy) - (side >> 1);
      if (x < 0 || y < 0 || x >= w - side || y >= h - side) continue;
      for (const o of dots) {
        const p = 4 * (y * w + x + o);
        data[p] = 23; data[p + 1] = 105; data[p + 2] = 170; data[p + 3] = 200;
      }
    }
    ctx.putImageData(img, 0, 0);
    if (map.selected >= 0) {
      const [sx, sy] = toScreen(map.selected);
      ctx.strokeStyle = "#c62828"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(sx, sy, 6, 0, 2 * Math.PI); ctx.stroke();
    }
  }

  function pick(px, py) {
    const canvas = $("fs-map"), v = map.view;
    const x = v.cx + (px - canvas.width / 2) / v.scale, y = v.cy - (py - canvas.height / 2) / v.scale;
    const radius = 8 / v.scale;
    const [x0, y0] = map.bounds, side = map.side;
    const lo = (t, o) => Math.max(0, Math.floor((t - radius - o) / map.cell));
    const hi = (t, o) => Math.min(side - 1, Math.floor((t + radius - o) / map.cell));
    let best = -1, bestD = radius * radius;
    for (let cy = lo(y, y0); cy <= hi(y, y0); cy++) {
      for (let cx = lo(x, x0); cx <= hi(x, x0); cx++) {
        const c = cy * side + cx;
        for (let j = map.start[c]; j < map.start[c + 1]; j++) {
          const i = map.order[j];
          const dx = map.xy[2 * i] - x, dy = map.xy[2 * i + 1] - y, d = dx * dx + dy * dy;
          if (d <= bestD) { bestD = d; best = i; }
        }
      }
    }
    return best;
  }

  async function showPoint(id) {
    const k = $("fs-k").value || body.dataset.fsK;
    try {
      const entry = await api("/api/gallery/" + id + "?k=" + encodeURIComponent(k));
      const label = entry.class ? " (" + entry.class + ")" : "";
      const grid = el("div", {id: "fs-point-neighbours", class: "fs-tiles fs-large"}, entry.neighbours.map(figure));
      $("fs-point").replaceChildren(
        el("h3", {text: "#" + entry.id + " " + entry.name + label}),
        el("img", {src: "/api/image/" + entry.id + "?size=320", alt: entry.name}),
        el("h3", {text: "its nearest gallery images"}), grid);
      body.dataset.fsPoint = String(id);
    } catch (err) {
      status(String(err.message || err), true);
    }
  }

  function setupMap() {
    const canvas = $("fs-map");
    let drag = null, moved = false;
    const at = (e) => {
      const r = canvas.getBoundingClientRect();
      return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
    };
    canvas.addEventListener("wheel", (e) => {
      if (!map.view) return;
      e.preventDefault();
      const [px, py] = at(e), v = map.view, f = e.deltaY < 0 ? 1.25 : 0.8;
      const x = v.cx + (px - canvas.width / 2) / v.scale, y = v.cy - (py - canvas.height / 2) / v.scale;
      v.scale *= f;
      v.cx = x - (px - canvas.width / 2) / v.scale; v.cy = y + (py - canvas.height / 2) / v.scale;
      drawMap();
    }, {passive: false});
    canvas.addEventListener("mousedown", (e) => { drag = at(e); moved = false; });
    canvas.addEventListener("mousemove", (e) => {
      if (!drag || !map.view) return;
      const [px, py] = at(e);
      if (Math.abs(px - drag[0]) + Math.abs(py - drag[1]) > 3) moved = true;
      if (!moved) return;
      map.view.cx -= (px - drag[0]) / map.view.scale; map.view.cy += (py - drag[1]) / map.view.scale;
      drag = [px, py];
      drawMap();
    });
    canvas.addEventListener("mouseup", (e) => {
      const wasDrag = moved; drag = null;
      if (wasDrag || !map.n) return;
      const [px, py] = at(e), i = pick(px, py);
      if (i < 0) return;
      map.selected = i;
      drawMap();
      showPoint(map.ids[i]);
    });
  }

  // -- choosing a photo ---------------------------------------------------------------------
  function setup() {
    const drop = $("fs-drop"), file = $("fs-file");
    file.addEventListener("change", () => {
      if (file.files.length) { photo = {blob: file.files[0]}; runQuery(); }
    });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("fs-over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("fs-over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault(); drop.classList.remove("fs-over");
      if (e.dataTransfer.files.length) { photo = {blob: e.dataTransfer.files[0]}; runQuery(); }
    });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter") file.click(); });
    const go = $("fs-path-go");
    if (go) {
      const send = () => { photo = {path: $("fs-path").value}; runQuery(); };
      go.addEventListener("click", send);
      $("fs-path").addEventListener("keydown", (e) => { if (e.key === "Enter") send(); });
    }
    $("fs-k").addEventListener("change", runQuery);
    $("fs-label").addEventListener("change", runQuery);
    setupMap();
    loadMap();
    body.dataset.fsReady = "1";
  }

  setup();
})();
