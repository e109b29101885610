// linewatch dashboard: a snapshot from /api/state, then live events over Server-Sent Events (/api/events).
// Plain JS, no build step; the chart is the vendored uPlot. All text goes in with textContent, never as HTML.
"use strict";

(function () {
  const FRAME_EVERY_MS = 200; // the live frame changes at most 5 times a second per camera
  const RECENT_MAX = 12;
  const COLOURS = { OK: "#2e7d32", NOK: "#c62828", ERROR: "#ef8f00", line: "#546e7a", pixel: "#1565c0", image: "#6a1b9a" };

  const app = {
    cameras: {}, // name -> {section, chart, data: {x, seq, score, verdict, pixel, image}, frame: pending preview}
    history: 200,
    gallerySize: 24,
    feedback: { enabled: false, token_required: false, pending: {} },
    detail: null, // {camera, seq}
    source: null,
  };

  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    let s = Number(v).toPrecision(digits || 4);
    if (s.includes(".") && !s.includes("e")) s = s.replace(/0+$/, "").replace(/\.$/, "");
    return s;
  }
  function text(el, value) {
    if (el && el.textContent !== String(value)) el.textContent = String(value);
  }
  function clock(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toLocaleTimeString();
  }
  function setSrc(img, url) {
    if (!url) {
      img.removeAttribute("src");
      img.hidden = true;
      return;
    }
    img.hidden = false;
    if (img.getAttribute("src") !== url) img.setAttribute("src", url);
  }

  // --- cameras --------------------------------------------------------------------------------------------------
  function camera(name) {
    let cam = app.cameras[name];
    if (cam) return cam;
    const section = $("#camera-template").content.firstElementChild.cloneNode(true);
    section.dataset.camera = name;
    text($(".name", section), name);
    const empty = $("#cameras .empty");
    if (empty) empty.remove();
    const list = $("#cameras");
    const after = $$("section.camera", list).find((s) => s.dataset.camera > name);
    list.insertBefore(section, after || null);
    cam = { name, section, chart: null, data: emptyTrend(), frame: null, frameShownAt: 0, frameTimer: null };
    app.cameras[name] = cam;
    cam.chart = makeChart(cam);
    $(".frame", section).addEventListener("click", () => {
      const seq = Number($(".frame", section).dataset.seq);
      if (seq) openDetail(name, seq);
    });
    return cam;
  }

  function emptyTrend() {
    return { x: [], seq: [], score: [], verdict: [], pixel: [], image: [] };
  }

  function applyCamera(view) {
    const cam = camera(view.camera);
    const s = cam.section;
    const verdict = $(".verdict", s);
    text(verdict, view.verdict || "–");
    verdict.dataset.verdict = view.verdict || "";
    text($(".score", s), num(view.image_score));
    const state = $(".camera-state", s);
    text(state, (view.state || "–") + (view.alive === false ? " (no life bit)" : "") +
      (view.healthy === false ? ` — unhealthy: ${view.unhealthy_reason || ""}` : ""));
    state.dataset.state = view.state || "";
    text($(".fps", s), view.fps === null || view.fps === undefined ? "–" : num(view.fps, 3));
    const lat = view.latency || {};
    text($(".latency", s), lat.p50 !== undefined && lat.p50 !== null
      ? `p50 ${num(lat.p50, 3)} ms · p99 ${num(lat.p99, 3)} ms`
      : view.latency_ms !== null && view.latency_ms !== undefined ? `${num(view.latency_ms, 3)} ms` : "–");
    const counts = view.counts || {};
    text($(".count-ok", s), counts.OK || 0);
    text($(".count-nok", s), counts.NOK || 0);
    text($(".count-error", s), counts.ERROR || 0);
    text($(".missed", s), view.missed ? `missed ${view.missed}` : "");
    const hour = view.per_hour || {};
    text($(".per-hour", s), `OK ${hour.OK || 0} · NOK ${hour.NOK || 0} · ERROR ${hour.ERROR || 0}`);
    text($(".calibration-version", s), view.calibration_version === null || view.calibration_version === undefined
      ? "uncalibrated" : `v${view.calibration_version}`);
    text($(".model-id", s), view.model_id || "–");
    const drift = view.drift || null;
    const driftEl = $(".drift", s);
    let driftText = "–";
    if (drift && drift.state === "unavailable") driftText = `unavailable${drift.reason ? ": " + drift.reason : ""}`;
    else if (drift && drift.state) {
      driftText = drift.state;
      if (drift.statistic !== undefined && drift.statistic !== null)
        driftText += ` (${num(drift.statistic, 3)} / warn ${num(drift.warn_at, 3)} / alarm ${num(drift.alarm_at, 3)})`;
      if (drift.state !== "ok") driftText += " — recalibrate";
    }
    text(driftEl, driftText);
    driftEl.dataset.drift = drift && drift.state ? drift.state : "";
    text($(".reason-latest", s), view.reason ? `#${view.seq}: ${view.reason}` : "");
    if (view.latest_preview !== undefined) queueFrame(cam, view.latest_preview);
  }

  // the live frame: the latest preview with its heat map and mask outline on top
  function queueFrame(cam, preview) {
    if (!preview) return;
    cam.frame = preview;
    const wait = cam.frameShownAt + FRAME_EVERY_MS - Date.now();
    if (wait <= 0) showFrame(cam);
    else if (!cam.frameTimer) cam.frameTimer = setTimeout(() => showFrame(cam), wait);
  }

  function showFrame(cam) {
    cam.frameTimer = null;
    cam.frameShownAt = Date.now();
    const p = cam.frame;
    if (!p) return;
    const s = cam.section;
    const img = $(".frame", s);
    img.dataset.seq = p.seq;
    setSrc(img, p.frame + "?preview=1");
    setSrc($(".frame-box .heatmap-overlay", s), p.heatmap);
    setSrc($(".frame-box .mask-overlay", s), p.mask ? p.mask + "?outline=1" : null);
    const caption = $(".frame-caption", s);
    text(caption, `#${p.seq} ${p.verdict} ${num(p.image_score)} · ${clock(p.time)}`);
    caption.dataset.verdict = p.verdict || "";
  }

  // --- trend chart ----------------------------------------------------------------------------------------------
  function makeChart(cam) {
    const el = $(".trend", cam.section);
    if (typeof uPlot === "undefined") return null;
    const pointsOnly = (colour) => ({
      stroke: colour, fill: colour, width: 0, paths: () => null, points: { show: true, size: 6, stroke: colour, fill: colour },
    });
    const opts = {
      width: Math.max(320, el.clientWidth || 600),
      height: 150,
      scales: { x: { time: false }, y: { range: (u, min, max) => [0, Math.max(max || 0, 1e-6) * 1.1] } },
      axes: [{ stroke: "#90a4ae", grid: { stroke: "#263238" } }, { stroke: "#90a4ae", grid: { stroke: "#263238" }, size: 50 }],
      legend: { show: true, live: false },
      cursor: { points: { size: 8 } },
      series: [
        { label: "part" },
        { label: "score", stroke: COLOURS.line, width: 1, points: { show: false } },
        Object.assign({ label: "NOK" }, pointsOnly(COLOURS.NOK)),
        Object.assign({ label: "ERROR (no score)" }, pointsOnly(COLOURS.ERROR)),
        { label: "pixel threshold", stroke: COLOURS.pixel, width: 1, dash: [6, 4], points: { show: false } },
        { label: "image threshold", stroke: COLOURS.image, width: 1, dash: [2, 3], points: { show: false } },
      ],
    };
    const chart = new uPlot(opts, chartData(cam.data), el);
    chart.over.addEventListener("click", () => {
      const i = chart.cursor.idx;
      if (i !== null && i !== undefined && cam.data.seq[i] !== undefined) openDetail(cam.name, cam.data.seq[i]);
    });
    return chart;
  }

  function chartData(d) {
    return [
      d.x,
      d.score,
      d.score.map((v, i) => (d.verdict[i] === "NOK" ? v : null)),
      d.verdict.map((v) => (v === "ERROR" ? 0 : null)),
      d.pixel,
      d.image,
    ];
  }

  function pushPoint(cam, p) {
    const d = cam.data;
    d.x.push(p.x); d.seq.push(p.seq); d.score.push(p.score); d.verdict.push(p.verdict);
    d.pixel.push(p.pixel); d.image.push(p.image);
    while (d.x.length > app.history) for (const k of Object.keys(d)) d[k].shift();
    drawChart(cam);
  }

  function drawChart(cam) {
    if (cam.drawPending) return;
    cam.drawPending = true;
    requestAnimationFrame(() => {
      cam.drawPending = false;
      if (cam.chart) cam.chart.setData(chartData(cam.data));
      $(".trend", cam.section).dataset.points = String(cam.data.x.length);
    });
  }

  window.addEventListener("resize", () => {
    for (const cam of Object.values(app.cameras)) {
      const el = $(".trend", cam.section);
      if (cam.chart) cam.chart.setSize({ width: Math.max(320, el.clientWidth), height: 150 });
    }
  });

  // --- banners --------------------------------------------------------------------------------------------------
  function applyBanner(b) {
    const box = $("#banners");
    let el = $$(".banner", box).find((e) => e.dataset.kind === b.kind && e.dataset.camera === (b.camera || ""));
    if (!b.active) {
      if (el) el.remove();
      return;
    }
    if (!el) {
      el = document.createElement("div");
      el.className = "banner";
      el.dataset.kind = b.kind;
      el.dataset.camera = b.camera || "";
      el.setAttribute("role", "alert");
      box.appendChild(el);
    }
    el.dataset.level = b.level || "error";
    text(el, `${b.text}${b.since ? " (since " + clock(b.since) + ")" : ""}`);
  }

  // --- gallery and recent parts ---------------------------------------------------------------------------------
  function galleryItem(item) {
    const box = $("#gallery");
    let el = $$(".gallery-item", box).find((e) => e.dataset.camera === item.camera && e.dataset.seq === String(item.seq));
    if (!el) {
      el = document.createElement("button");
      el.type = "button";
      el.className = "gallery-item";
      el.dataset.camera = item.camera;
      el.dataset.seq = String(item.seq);
      el.dataset.verdict = item.verdict;
      const img = document.createElement("img");
      img.alt = `${item.camera} part ${item.seq}`;
      const cap = document.createElement("span");
      cap.className = "caption";
      el.append(img, cap);
      el.addEventListener("click", () => openDetail(item.camera, item.seq));
      box.insertBefore(el, box.firstChild);
      while (box.children.length > app.gallerySize) box.lastChild.remove();
    }
    const img = $("img", el);
    if (item.has_preview) setSrc(img, item.links.frame + "?preview=1");
    else img.hidden = true;
    el.classList.toggle("no-frame", !item.has_preview);
    text($(".caption", el), `${item.camera} #${item.seq} ${item.verdict} ${num(item.image_score)} ${clock(item.time)}`);
    el.title = item.reason || "";
  }

  function recentItem(item) {
    const box = $("#recent");
    const old = $$(".recent-item", box).find((e) => e.dataset.camera === item.camera && e.dataset.seq === String(item.seq));
    if (old) old.remove();
    const li = document.createElement("li");
    li.className = "recent-item";
    li.dataset.camera = item.camera;
    li.dataset.seq = String(item.seq);
    li.dataset.verdict = item.verdict;
    li.tabIndex = 0;
    text(li, `${item.camera} #${item.seq} ${item.verdict} ${num(item.image_score)} ${clock(item.time)}`);
    li.addEventListener("click", () => openDetail(item.camera, item.seq));
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") openDetail(item.camera, item.seq); });
    box.insertBefore(li, box.firstChild);
    while (box.children.length > RECENT_MAX) box.lastChild.remove();
  }

  // --- detail and feedback --------------------------------------------------------------------------------------
  async function openDetail(cameraName, seq) {
    const detail = $("#detail");
    app.detail = { camera: cameraName, seq };
    const result = $(".feedback-result", detail);
    text(result, "");
    delete result.dataset.outcome;
    // nothing of the part opened before may show (or be marked) while this one loads
    for (const img of $$("img", detail)) setSrc(img, null);
    $("tbody", detail).replaceChildren();
    text($(".reason", detail), "loading…");
    text($(".detail-verdict", detail), "");
    text($(".frame-source", detail), "");
    for (const button of $$("button[data-feedback]", detail)) button.disabled = true;
    detail.hidden = false;
    text($(".title", detail), `${cameraName} part #${seq}`);
    let part;
    try {
      const r = await fetch(`/api/part/${encodeURIComponent(cameraName)}/${seq}`);
      part = await r.json();
      if (!r.ok) throw new Error(part.error || r.statusText);
    } catch (err) {
      text($(".reason", detail), `cannot open this part: ${err.message}`);
      for (const img of $$("img", detail)) setSrc(img, null);
      $("tbody", detail).replaceChildren();
      showFeedback(null);
      return;
    }
    if (!app.detail || app.detail.camera !== cameraName || app.detail.seq !== seq) return;
    app.detail.part = part;
    const v = $(".detail-verdict", detail);
    text(v, `${part.verdict} · score ${num(part.image_score)}${part.part_id ? " · part " + part.part_id : ""} · ${clock(part.time)}`);
    v.dataset.verdict = part.verdict || "";
    setSrc($("img.full", detail), part.links.frame);
    setSrc($(".full-box .heatmap-overlay", detail), part.links.heatmap);
    setSrc($(".full-box .mask-overlay", detail), part.links.mask ? part.links.mask + "?outline=1" : null);
    setSrc($("img.heatmap", detail), part.links.heatmap ? part.links.heatmap + "?opaque=1" : null);
    text($(".frame-source", detail), part.frame_source === "archive" ? "full frame from the archive"
      : part.frame_source === "preview" ? "preview (downscaled)" : "no frame held for this part");
    text($(".reason", detail), part.reason || "");
    const rows = (part.regions || []).map((r, i) => {
      const tr = document.createElement("tr");
      const cells = [i + 1, `${r.bbox[0]}, ${r.bbox[1]}`, `${r.bbox[2]} × ${r.bbox[3]}`, r.area, num(r.peak), r.defect ? "defect" : "speck"];
      for (const c of cells) {
        const td = document.createElement("td");
        td.textContent = String(c);
        tr.appendChild(td);
      }
      tr.dataset.defect = String(Boolean(r.defect));
      return tr;
    });
    $("tbody", detail).replaceChildren(...rows);
    $(".regions", detail).dataset.count = String(rows.length);
    showFeedback(part);
  }

  function showFeedback(part) {
    const detail = $("#detail");
    const box = $(".feedback", detail);
    box.hidden = !app.feedback.enabled;
    for (const button of $$("button[data-feedback]", detail)) {
      button.hidden = !app.feedback.enabled;
      const allowed = part && part.feedback && part.feedback.allowed.includes(button.dataset.feedback);
      button.disabled = !allowed;
      button.title = allowed ? "" : button.dataset.feedback === "false_reject"
        ? "only a NOK part with a frame can be marked as a good part"
        : "only an OK part with a frame can be marked as a missed defect";
    }
    const who = $("input.who", detail);
    if (!who.value) who.value = localStorage.getItem("linewatch.who") || "operator";
  }

  function closeDetail() {
    $("#detail").hidden = true;
    app.detail = null;
  }

  async function sendFeedback(kind) {
    const detail = $("#detail");
    const result = $(".feedback-result", detail);
    if (!app.detail) return;
    const who = $("input.who", detail).value.trim();
    const why = $("input.why", detail).value.trim();
    if (who) localStorage.setItem("linewatch.who", who);
    const body = JSON.stringify({ camera: app.detail.camera, seq: app.detail.seq, kind, who, why });
    result.dataset.outcome = "pending";
    text(result, "saving…");
    let token = localStorage.getItem("linewatch.token");
    if (app.feedback.token_required && !token) token = askToken();
    for (let attempt = 0; attempt < 2; attempt++) {
      const headers = { "Content-Type": "application/json" };
      if (token) headers.Authorization = `Bearer ${token}`;
      let r, reply;
      try {
        r = await fetch("/api/feedback", { method: "POST", headers, body });
        reply = await r.json();
      } catch (err) {
        result.dataset.outcome = "error";
        text(result, `not saved: ${err.message}`);
        return;
      }
      if (r.status === 401 && attempt === 0) {
        token = askToken();
        if (token) continue;
      }
      if (r.status === 201) {
        result.dataset.outcome = "saved";
        const file = String(reply.path).split("/").pop();
        text(result, `saved the ${reply.source === "archive" ? "full frame" : "preview"} as ${file}`);
        setPending(reply.pending);
      } else {
        result.dataset.outcome = "error";
        text(result, `not saved (${r.status}): ${reply.error || r.statusText}`);
      }
      return;
    }
  }

  function askToken() {
    const token = window.prompt("Token to mark parts (ask the line's engineer):") || "";
    if (token) localStorage.setItem("linewatch.token", token.trim());
    else localStorage.removeItem("linewatch.token");
    return token.trim();
  }

  function setPending(pending) {
    const el = $("#feedback-pending");
    if (!app.feedback.enabled) {
      el.hidden = true;
      text(el, "");
      return;
    }
    app.feedback.pending = pending || {};
    const fr = app.feedback.pending.false_reject || 0;
    const md = app.feedback.pending.missed_defect || 0;
    el.hidden = false;
    el.dataset.count = String(fr + md);
    text(el, `${fr + md} correction(s) waiting: ${fr} false reject · ${md} missed defect`);
  }

  // --- state and events -----------------------------------------------------------------------------------------
  async function loadState() {
    let snap;
    try {
      const r = await fetch("/api/state");
      snap = await r.json();
    } catch (err) {
      return;
    }
    app.history = snap.history || app.history;
    app.gallerySize = snap.gallery_size || app.gallerySize;
    app.feedback = Object.assign({ pending: {} }, snap.feedback || {});
    text($("#source"), snap.daemon && snap.daemon.source ? `daemon ${snap.daemon.source}` : "");
    setPending(app.feedback.pending);
    for (const view of Object.values(snap.cameras || {})) {
      const cam = camera(view.camera);
      applyCamera(view);
      cam.data = Object.assign(emptyTrend(), view.trend || {});
      drawChart(cam);
    }
    for (const el of $$("#banners .banner")) el.remove();
    for (const b of snap.banners || []) applyBanner(b);
    $("#gallery").replaceChildren();
    for (const item of (snap.gallery || []).slice().reverse()) galleryItem(item);
    $("#recent").replaceChildren();
    for (const item of (snap.recent || []).slice().reverse()) recentItem(item);
  }

  function onResult(data) {
    const cam = camera(data.camera);
    applyCamera(data);
    if (data.point) pushPoint(cam, data.point);
    if (data.gallery_item) galleryItem(data.gallery_item);
  }

  function onPreview(data) {
    const cam = camera(data.camera);
    queueFrame(cam, data.latest_preview);
    if (data.in_gallery) galleryItem(data);
    recentItem(data);
  }

  let source = null;
  function connect() {
    if (source) source.close();
    source = new EventSource("/api/events");
    source.addEventListener("open", () => {
      document.body.dataset.connected = "true";
      text($("#connection"), "live");
      loadState();
    });
    source.addEventListener("error", () => {
      document.body.dataset.connected = "false";
      text($("#connection"), "disconnected: reconnecting…");
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
    });
    source.addEventListener("result", (e) => onResult(JSON.parse(e.data)));
    source.addEventListener("status", (e) => applyCamera(JSON.parse(e.data)));
    source.addEventListener("preview", (e) => onPreview(JSON.parse(e.data)));
    source.addEventListener("banner", (e) => applyBanner(JSON.parse(e.data)));
    source.addEventListener("feedback", (e) => setPending(JSON.parse(e.data).pending));
  }

  function start() {
    $("#detail .close").addEventListener("click", closeDetail);
    $("#detail").addEventListener("click", (e) => { if (e.target.id === "detail") closeDetail(); });
    document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });
    for (const button of $$("#detail button[data-feedback]")) {
      button.addEventListener("click", () => sendFeedback(button.dataset.feedback));
    }
    const toggles = { "show-heatmap": "hide-heatmap", "show-mask": "hide-mask" };
    for (const [id, cls] of Object.entries(toggles)) {
      $("#" + id).addEventListener("change", (e) => document.body.classList.toggle(cls, !e.target.checked));
    }
    setPending({});
    connect();
  }

  start();
})();
