// uPlot wrappers for live step-indexed series, after uPlot's demos/stream-data.html: columnar
// data [xs, ys1, ys2, ...], a sliding window of steps, setData at most a few times a second.

import uPlot from '/vendor/uplot/uPlot.esm.js';
import { nonFinite, spell } from './figures.js';

export const WINDOW_STEPS = 2000; // the sliding window: the latest N steps
const MAX_POINTS = 500; // x positions per chart after downsampling
const REDRAW_MS = 250; // at most four redraws a second per chart (fewer if drawing is slow)
const HEIGHT = 240;
const NON_FINITE_COLOR = '#b3261e';
const NON_FINITE_LABEL_GAP_PX = 48; // a label per run of marks at least this far from the last one

/** Distinct, stable colours for up to hundreds of ranks (golden-angle hues). */
export const rankColor = (rank, alpha = 1) => `hsl(${(rank * 137.508) % 360} 70% 42% / ${alpha})`;

const finite = (v) => typeof v === 'number' && Number.isFinite(v);

// Bucket reducers. A bucket's value is sum(num) / sum(den) over its records (records where either
// is missing are skipped), or, for `latest`, the value of the record that came last.

/** The mean of value(rec) over a bucket. */
export const mean = (value) => ({ num: value, den: () => 1 });

/** sum(num) / sum(den) over a bucket, e.g. steps per second or the share of time averaging. */
export const ratio = (num, den) => ({ num, den });

/** The latest value in a bucket (for state such as the period). */
export const latest = (value) => ({ latest: value });

/** The median of the non-null values, or null. */
const median = (ys) => {
  const v = ys.filter((y) => y !== null).sort((a, b) => a - b);
  return v.length ? (v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2) : null;
};

const defined = (obj) => Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined));

/**
 * A live chart over steps. Each series folds its records into buckets of steps as they arrive, so a
 * draw costs (series x buckets), not (records); the raw records in the window are kept to fold
 * again when the bucket width grows or what a series shows changes (relative divergence).
 */
export class LiveChart {
  /** axes: y axes [{label, scale?, side?}]; markers(): [{x, label, color?}] drawn as dashed vertical lines;
   * minBucket: fewest steps per drawn point (rates need a few steps to mean something). */
  constructor(el, { axes = [{ label: '' }], scales = {}, markers = null, legendMax = 16, minBucket = 1 } = {}) {
    Object.assign(this, { el, axes, scales, markers, legendMax, minBucket });
    this.series = new Map();
    // Steps where a series' figure was NaN or infinite (step -> "NaN" | "+Inf" | "-Inf"): no point
    // can show them (uPlot would lose its scale), so each is a gap marked on the plot.
    this.nonFinite = new Map();
    this.maxX = -Infinity;
    this.w = minBucket; // steps per bucket
    this.refoldNeeded = false;
    this.plot = null;
    this.shape = '';
    this.timer = null;
    this.lastDraw = 0;
    this.drawMs = 0;
    this.dead = false;
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(el);
  }

  /** Declare a series once: {label, stroke, reduce: mean(...) | ratio(...) | latest(...), scale?,
   * width?, dash?, stepped?, max? (clamp), z? (higher draws later, on top)}. */
  define(key, spec) {
    if (!this.series.has(key)) this.series.set(key, { ...spec, xs: [], recs: [], agg: new Map(), held: null, heldK: -Infinity });
  }

  push(key, x, rec) {
    const s = this.series.get(key);
    s.xs.push(x);
    s.recs.push(rec);
    this.fold(s, x, rec);
    if (x > this.maxX) this.maxX = x;
    this.invalidate();
  }

  // One record into its bucket: [sum of num, sum of den], or the latest value.
  fold(s, x, rec) {
    const k = Math.floor(x / this.w);
    if (s.reduce.latest) {
      const v = s.reduce.latest(rec);
      if (finite(v)) s.agg.set(k, v);
      return;
    }
    const a = s.reduce.num(rec);
    const b = s.reduce.den(rec);
    if (!finite(a) || !finite(b)) {
      const bad = nonFinite(a) ? a : b;
      if (nonFinite(bad) && !this.nonFinite.has(x)) this.nonFinite.set(x, spell(bad));
      return;
    }
    const cell = s.agg.get(k);
    if (cell) { cell[0] += a; cell[1] += b; } else s.agg.set(k, [a, b]);
  }

  refold() {
    this.nonFinite.clear();
    for (const s of this.series.values()) {
      s.agg.clear();
      s.heldK = -Infinity;
      for (let i = 0; i < s.xs.length; i++) this.fold(s, s.xs[i], s.recs[i]);
    }
  }

  /** Forget the records of series `key` after step `x` (a restore: that part of its history was
   * undone), so what comes next starts from there. */
  cutAfter(key, x) {
    const s = this.series.get(key);
    if (!s) return;
    const keep = s.xs.map((v) => v <= x);
    s.xs = s.xs.filter((_, i) => keep[i]);
    s.recs = s.recs.filter((_, i) => keep[i]);
    this.invalidate(true);
  }

  /** Let the x range reach step `x` (the job's latest step) even where no series has a point. */
  extendTo(x) {
    if (x > this.maxX) { this.maxX = x; this.invalidate(); }
  }

  clear() {
    for (const s of this.series.values()) Object.assign(s, { xs: [], recs: [], agg: new Map(), held: null, heldK: -Infinity });
    this.nonFinite.clear();
    this.maxX = -Infinity;
    this.invalidate();
  }

  /** Schedule a redraw: at most one per REDRAW_MS, in an animation frame. `refold`: what a series
   * shows changed (fold the records again and rebuild the plot). */
  invalidate(refold = false) {
    if (refold) { this.shape = ''; this.refoldNeeded = true; }
    if (this.timer !== null) return;
    // A chart that is slow to draw (many ranks, a slow machine) draws less often: <= ~10% busy.
    const wait = Math.max(0, this.lastDraw + Math.max(REDRAW_MS, 10 * this.drawMs) - performance.now());
    this.timer = setTimeout(() => requestAnimationFrame(() => {
      this.timer = null;
      this.lastDraw = performance.now();
      this.draw();
      this.drawMs = performance.now() - this.lastDraw;
    }), wait);
  }

  destroy() {
    this.dead = true;
    clearTimeout(this.timer);
    this.resize.disconnect();
    this.plot?.destroy();
    this.plot = null;
    // What draw() told scripts and tests about this chart goes with it (the element stays, for the next page).
    for (const key of ['points', 'nonFinite', 'series', 'medians', 'lasts', 'markers', 'markerLabels']) delete this.el.dataset[key];
  }

  size() {
    return { width: Math.max(200, this.el.clientWidth), height: HEIGHT };
  }

  draw() {
    if (this.dead || !Number.isFinite(this.maxX)) return;
    const hi = this.maxX;
    const lo = Math.max(0, hi - WINDOW_STEPS);
    const w = Math.max(this.minBucket, Math.ceil((hi - lo + 1) / MAX_POINTS));
    const all = [...this.series.values()].sort((a, b) => (a.z ?? 0) - (b.z ?? 0));
    for (const s of all) trim(s, lo);
    for (const x of this.nonFinite.keys()) if (x < lo) this.nonFinite.delete(x);
    if (w !== this.w || this.refoldNeeded) {
      this.w = w;
      this.refoldNeeded = false;
      this.refold();
    }
    // Buckets that left the window go; a stepped series remembers the last value they held.
    const klo = Math.floor(lo / w);
    const khi = Math.floor(hi / w);
    let k0 = khi;
    for (const s of all) {
      for (const [k, v] of s.agg) {
        if (k >= klo) { if (k < k0) k0 = k; continue; }
        if (s.reduce.latest && k > s.heldK) { s.heldK = k; s.held = v; }
        s.agg.delete(k);
      }
      if (s.stepped && s.held !== null) k0 = klo;
    }
    const n = khi - k0 + 1;
    const xs = new Float64Array(n);
    for (let j = 0; j < n; j++) xs[j] = (k0 + j) * w;
    this.range = [xs[0], Math.max(hi, xs[0] + 1)];
    let points = 0;
    const data = [xs, ...all.map((s) => {
      const ys = new Array(n).fill(null);
      let held = s.stepped ? s.held : null;
      for (let j = 0; j < n; j++) {
        const c = s.agg.get(k0 + j);
        let y = null;
        if (c !== undefined) y = s.reduce.latest ? c : c[1] > 0 ? c[0] / c[1] : null;
        if (y !== null && s.max !== undefined) y = Math.min(s.max, y);
        if (s.stepped) { y = y ?? held; held = y; }
        ys[j] = y;
        if (y !== null) points += 1;
      }
      return ys;
    })];
    const shape = all.map((s) => s.label).join('|') + this.axes.map((a) => a.label).join('|');
    if (!this.plot || shape !== this.shape) this.build(all, data, shape);
    else this.plot.setData(data);
    this.el.dataset.points = String(points);
    this.el.dataset.nonFinite = String(this.nonFinite.size);
    this.el.dataset.series = String(all.length);
    // What each series shows, in one number per series (its median point, its last), for scripts and tests.
    this.el.dataset.medians = JSON.stringify(Object.fromEntries(all.map((s, i) => [s.label, median(data[i + 1])])));
    this.el.dataset.lasts = JSON.stringify(Object.fromEntries(all.map((s, i) => [s.label, data[i + 1].findLast((y) => y !== null) ?? null])));
  }

  build(all, data, shape) {
    this.plot?.destroy();
    this.shape = shape;
    const opts = {
      ...this.size(),
      // Every chart shows the same window of steps, so their cursors line up.
      scales: { x: { time: false, range: () => this.range }, ...this.scales },
      axes: [{ label: 'step' }, ...this.axes.map((a, i) => ({ scale: 'y', side: 3, grid: { show: i === 0 }, ...a }))],
      series: [{ label: 'step' }, ...all.map((s) => defined({
        label: s.label,
        stroke: s.stroke,
        width: s.width ?? 1,
        dash: s.dash,
        scale: s.scale ?? 'y',
        spanGaps: true,
        paths: s.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
      }))],
      legend: { show: all.length <= this.legendMax },
      cursor: { sync: { key: 'avgctl-steps' } },
      hooks: { draw: [(u) => this.drawMarkers(u), (u) => this.drawNonFinite(u)] },
    };
    this.plot = new uPlot(opts, data, this.el);
  }

  drawMarkers(u) {
    const marks = this.markers ? this.markers() : [];
    this.el.dataset.markers = String(marks.length);
    this.el.dataset.markerLabels = JSON.stringify(marks.map((m) => m.label));
    const { ctx } = u;
    const { left, top, width, height } = u.bbox;
    const r = devicePixelRatio || 1;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    ctx.lineWidth = r;
    ctx.setLineDash([4 * r, 4 * r]);
    ctx.font = `${11 * r}px system-ui, sans-serif`;
    // In step order, so neighbours take different rows of the stagger.
    for (const [i, m] of [...marks].sort((a, b) => a.x - b.x).entries()) {
      if (m.x < u.scales.x.min || m.x > u.scales.x.max) continue;
      const px = Math.round(u.valToPos(m.x, 'x', true)) + 0.5;
      ctx.strokeStyle = m.color ?? '#7a5cc2';
      ctx.fillStyle = m.color ?? '#5a3fa0';
      ctx.beginPath();
      ctx.moveTo(px, top);
      ctx.lineTo(px, top + height);
      ctx.stroke();
      // Left of the line where the label would run past the plot's right edge. (uPlot leaves its
      // own axis labels' alignment on the context: set ours.)
      const flip = px + 3 * r + ctx.measureText(m.label).width > left + width;
      ctx.textAlign = flip ? 'right' : 'left';
      ctx.fillText(m.label, flip ? px - 3 * r : px + 3 * r, top + 12 * r * (1 + (i % 3))); // staggered: marks can be close
    }
    ctx.restore();
  }

  /** Each step with a non-finite figure as a thin red line over the plot (a run of them: a band),
   * labelled "NaN" / "+Inf" / "-Inf" where a run starts. */
  drawNonFinite(u) {
    if (!this.nonFinite.size) return;
    const { ctx } = u;
    const { left, top, width, height } = u.bbox;
    const r = devicePixelRatio || 1;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    ctx.font = `${11 * r}px system-ui, sans-serif`;
    ctx.textAlign = 'left'; // uPlot leaves its axis labels' alignment on the context
    let lastLabel = -Infinity;
    for (const [x, label] of [...this.nonFinite].sort((p, q) => p[0] - q[0])) {
      if (x < u.scales.x.min || x > u.scales.x.max) continue;
      const px = Math.round(u.valToPos(x, 'x', true));
      ctx.fillStyle = 'rgba(179, 38, 30, 0.18)';
      ctx.fillRect(px - r, top, 2 * r, height);
      if (px - lastLabel >= NON_FINITE_LABEL_GAP_PX * r) {
        ctx.fillStyle = NON_FINITE_COLOR;
        ctx.fillText(label, px + 3 * r, top + height - 6 * r);
        lastLabel = px;
      }
    }
    ctx.restore();
  }
}

// Drop raw records that left the window, a quarter window at a time (their buckets are dropped at
// every draw; the raw records only matter for folding again).
function trim(s, lo) {
  if (!s.xs.length || s.xs[0] >= lo - WINDOW_STEPS / 4) return;
  const xs = [];
  const recs = [];
  for (let i = 0; i < s.xs.length; i++) if (s.xs[i] >= lo) { xs.push(s.xs[i]); recs.push(s.recs[i]); }
  Object.assign(s, { xs, recs });
}
