// neurodyn explore: the page's logic (no dependencies; everything is served by the local server).
"use strict";

// What the browser test reads: draw counters, click-to-redraw latencies (ms), the last answers.
const stats = { ringsDraws: 0, latentDraws: 0, latencies: [], rings: null, latent: null, errors: 0 };
window.__explore = stats;

let info = null;

function showError(msg) {
  document.getElementById("error").textContent = msg || "";
  if (msg) stats.errors += 1;
}

async function postJSON(url, body) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), 10000);
  try {
    const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                 body: JSON.stringify(body), signal: ctrl.signal });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
    return data;
  } finally {
    clearTimeout(timer);
  }
}

function nextFrame() {
  return new Promise((resolve) => requestAnimationFrame(() => resolve()));
}

// ------------------------------------------------------------------------------------------------- rings
let ringsSeq = 0;

function drawRings(name, state) {
  const cv = document.getElementById("canvas-" + name);
  const ctx = cv.getContext("2d");
  const w = cv.width, h = cv.height, ext = info.models[name].extent;
  const sx = (v) => w / 2 + (v / ext) * (w / 2 - 10);
  const sy = (v) => h / 2 - (v / ext) * (h / 2 - 10);
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#ddd";
  ctx.beginPath(); ctx.moveTo(0, h / 2); ctx.lineTo(w, h / 2); ctx.moveTo(w / 2, 0); ctx.lineTo(w / 2, h); ctx.stroke();
  state.points.forEach((p, i) => {
    const color = info.labels[i] < 0 ? "#1f77b4" : "#d62728";
    ctx.beginPath();
    ctx.arc(sx(p[0]), sy(p[1]), 3, 0, 2 * Math.PI);
    if (state.correct[i]) { ctx.fillStyle = color; ctx.fill(); } else { ctx.strokeStyle = color; ctx.stroke(); }
  });
  document.getElementById("acc-" + name).textContent = (100 * state.accuracy).toFixed(1) + "%";
  document.getElementById("dim-" + name).textContent = "(" + state.state_dim + "-d state)";
  cv.dataset.t = String(state.t);
}

async function updateRings() {
  const t = Number(document.getElementById("t-slider").value);
  document.getElementById("t-value").textContent = t.toFixed(2);
  const seq = ++ringsSeq;
  try {
    const data = await postJSON("/api/rings", { t: t });
    if (seq !== ringsSeq) return; // a newer slider position is on its way
    for (const name of Object.keys(data.models)) drawRings(name, data.models[name]);
    stats.rings = data;
    stats.ringsDraws += 1;
    showError("");
  } catch (e) {
    if (seq === ringsSeq) showError("rings: " + e.message);
  }
}

// ------------------------------------------------------------------------------------------------ latent
const latent = { points: [], seq: 0, answer: null };
const PAD = { left: 40, right: 10, top: 10, bottom: 28 };
const X_VIEW = [-1.0, 3.0];

function latentScales() {
  const cv = document.getElementById("latent-canvas");
  const [t0, t1] = info.t_range;
  const iw = cv.width - PAD.left - PAD.right, ih = cv.height - PAD.top - PAD.bottom;
  return {
    px: (t) => PAD.left + ((t - t0) / (t1 - t0)) * iw,
    py: (x) => PAD.top + ((X_VIEW[1] - x) / (X_VIEW[1] - X_VIEW[0])) * ih,
    t: (px) => t0 + ((px - PAD.left) / iw) * (t1 - t0),
    x: (py) => X_VIEW[1] - ((py - PAD.top) / ih) * (X_VIEW[1] - X_VIEW[0]),
  };
}

function drawLatent() {
  const cv = document.getElementById("latent-canvas");
  const ctx = cv.getContext("2d");
  const s = latentScales();
  ctx.clearRect(0, 0, cv.width, cv.height);
  ctx.strokeStyle = "#ddd"; ctx.fillStyle = "#666"; ctx.font = "11px sans-serif";
  for (let t = info.t_range[0]; t <= info.t_range[1] + 1e-9; t += 1) {
    ctx.beginPath(); ctx.moveTo(s.px(t), PAD.top); ctx.lineTo(s.px(t), cv.height - PAD.bottom); ctx.stroke();
    ctx.fillText(String(t), s.px(t) - 3, cv.height - 10);
  }
  for (let x = X_VIEW[0]; x <= X_VIEW[1] + 1e-9; x += 1) {
    ctx.beginPath(); ctx.moveTo(PAD.left, s.py(x)); ctx.lineTo(cv.width - PAD.right, s.py(x)); ctx.stroke();
    ctx.fillText(String(x), 12, s.py(x) + 4);
  }
  const a = latent.answer;
  if (a) {
    ctx.fillStyle = "rgba(255, 127, 14, 0.25)";
    ctx.beginPath();
    a.grid.forEach((t, i) => (i ? ctx.lineTo(s.px(t), s.py(a.upper[i])) : ctx.moveTo(s.px(t), s.py(a.upper[i]))));
    for (let i = a.grid.length - 1; i >= 0; i--) ctx.lineTo(s.px(a.grid[i]), s.py(a.lower[i]));
    ctx.closePath(); ctx.fill();
    ctx.lineWidth = 0.7; ctx.strokeStyle = "rgba(255, 127, 14, 0.6)";
    for (const curve of a.samples) {
      ctx.beginPath();
      a.grid.forEach((t, i) => (i ? ctx.lineTo(s.px(t), s.py(curve[i])) : ctx.moveTo(s.px(t), s.py(curve[i]))));
      ctx.stroke();
    }
    ctx.lineWidth = 2; ctx.strokeStyle = "#d95f02";
    ctx.beginPath();
    a.grid.forEach((t, i) => (i ? ctx.lineTo(s.px(t), s.py(a.mean[i])) : ctx.moveTo(s.px(t), s.py(a.mean[i]))));
    ctx.stroke();
    ctx.lineWidth = 1;
  }
  ctx.fillStyle = "#000";
  for (const p of latent.points) {
    ctx.beginPath(); ctx.arc(s.px(p.t), s.py(p.x), 4, 0, 2 * Math.PI); ctx.fill();
  }
}

async function updateLatent(started) {
  const seq = ++latent.seq;
  const status = document.getElementById("latent-status");
  try {
    const data = await postJSON("/api/latent", { points: latent.points });
    if (seq !== latent.seq) return;
    latent.answer = data;
    drawLatent();
    await nextFrame();
    const ms = performance.now() - started;
    stats.latencies.push(ms);
    stats.latent = data;
    stats.latentDraws += 1;
    status.textContent = latent.points.length + " points; updated in " + ms.toFixed(0) + " ms";
    showError("");
  } catch (e) {
    if (seq === latent.seq) showError("latent ODE: " + e.message);
  }
}

function onLatentClick(ev) {
  const started = performance.now();
  const cv = ev.currentTarget;
  const rect = cv.getBoundingClientRect();
  const px = (ev.clientX - rect.left) * (cv.width / rect.width);
  const py = (ev.clientY - rect.top) * (cv.height / rect.height);
  const s = latentScales();
  if (ev.shiftKey) {
    if (!latent.points.length) return;
    let best = 0, bestD = Infinity;
    latent.points.forEach((p, i) => {
      const d = (s.px(p.t) - px) ** 2 + (s.py(p.x) - py) ** 2;
      if (d < bestD) { bestD = d; best = i; }
    });
    latent.points.splice(best, 1);
  } else {
    const t = s.t(px), x = s.x(py);
    if (t < info.t_range[0] || t > info.t_range[1] || x < X_VIEW[0] || x > X_VIEW[1]) return;
    if (latent.points.length >= info.max_points) {
      showError("at most " + info.max_points + " points; shift-click to remove one");
      return;
    }
    latent.points.push({ t: t, x: x });
  }
  drawLatent();
  updateLatent(started);
}

function exampleSeries() {
  // sin(2 pi f t) + 1 at ten irregular times (the kind of series the model was trained on)
  const times = [0.0, 0.35, 0.8, 1.1, 1.7, 2.2, 2.45, 3.1, 3.6, 4.4];
  return times.map((t) => ({ t: t, x: Math.sin(2 * Math.PI * 0.6 * t) + 1.0 }));
}

// -------------------------------------------------------------------------------------------------- start
async function start() {
  try {
    const r = await fetch("/api/info");
    info = await r.json();
  } catch (e) {
    showError("cannot reach the server: " + e.message);
    return;
  }
  document.getElementById("source").textContent = "Models: " + info.source + ".";
  document.getElementById("t-slider").addEventListener("input", updateRings);
  const cv = document.getElementById("latent-canvas");
  cv.addEventListener("click", onLatentClick);
  document.getElementById("latent-clear").addEventListener("click", () => {
    latent.points = []; drawLatent(); updateLatent(performance.now());
  });
  document.getElementById("latent-example").addEventListener("click", () => {
    latent.points = exampleSeries(); drawLatent(); updateLatent(performance.now());
  });
  latent.points = exampleSeries();
  drawLatent();
  await Promise.all([updateRings(), updateLatent(performance.now())]);
  document.body.dataset.ready = "1";
}

start();
