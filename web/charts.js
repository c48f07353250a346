// uPlot wrappers for live step-indexed series, after uPlot's demos/stream-data.html: columnar
// data [xs, ys1, ys2, ...], the whole run folded into at most MAX_POINTS buckets (their width
// doubles as the run grows, so buckets merge exactly), setData at most a few times a second.
// The per-rank charts read their history from the server instead (history.js).

import uPlot from '/vendor/uplot/uPlot.esm.js';
import { nonFinite, spell } from './figures.js';

const MAX_POINTS = 500; // x positions per chart after downsampling
const REDRAW_MS = 250; // at most four redraws a second per chart (fewer if drawing is slow)
export const HEIGHT = 240;
const NON_FINITE_COLOR = '#b3261e';
const NON_FINITE_LABEL_GAP_PX = 48; // a label per run of marks at least this far from the last one
export const SYNC_KEY = 'avgctl-steps';
export const DRAW_MEASURE = 'avgctl-draw'; // performance.measure() of each chart draw, for bench/dashboard.py

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
export const median = (ys) => {
  const v = ys.filter((y) => y !== null && Number.isFinite(y)).sort((a, b) => a - b);
  return v.length ? (v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2) : null;
};

export const defined = (obj) => Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined));

/** Run `draw` and record how long it took as a performance measure (DRAW_MEASURE); returns ms. */
export function measured(name, draw) {
  const t0 = performance.now();
  draw();
  const t1 = performance.now();
  performance.measure(DRAW_MEASURE, { start: t0, end: t1, detail: name });
  performance.clearMeasures(DRAW_MEASURE); // observers still get them; the timeline must not grow for hours
  return t1 - t0;
}

/** Schedule `chart.draw()`: at most one per REDRAW_MS, in an animation frame; a chart that is slow
 * to draw (many ranks, a slow machine) draws less often, <= ~10% busy. Keeps `timer`, `lastDraw`
 * and `drawMs` on the chart. */
export function scheduleDraw(chart) {
  if (chart.timer !== null || chart.dead) return;
  const wait = Math.max(0, chart.lastDraw + Math.max(REDRAW_MS, 10 * chart.drawMs) - performance.now());
  chart.timer = setTimeout(() => requestAnimationFrame(() => {
    chart.timer = null;
    chart.lastDraw = performance.now();
    chart.drawMs = measured(chart.el.id, () => chart.draw());
  }), wait);
}

/** Run `draw(ctx, bbox, r)` on uPlot's canvas clipped to the plot area (r: device pixel ratio),
 * with the context restored after and the font our labels use. */
function clippedToPlot(u, draw) {
  const { ctx } = u;
  const r = devicePixelRatio || 1;
  ctx.save();
  ctx.beginPath();
  ctx.rect(u.bbox.left, u.bbox.top, u.bbox.width, u.bbox.height);
  ctx.clip();
  ctx.font = `${11 * r}px system-ui, sans-serif`;
  draw(ctx, u.bbox, r);
  ctx.restore();
}

/**
 * uPlot options shared by every chart of a job page: the cursor lines up across charts, a drag
 * selects a range of steps that `view` (view.js) then shows on every chart, a double-click goes
 * back to the whole run. Only the chart under the mouse publishes the drag (synced charts would
 * each set a slightly different range).
 */
export function zoomOptions(view) {
  return {
    cursor: {
      drag: { x: true, y: false, setScale: false },
      sync: { key: SYNC_KEY, filters: { pub: (type) => type !== 'mousedown' && type !== 'mouseup' && type !== 'dblclick' } },
    },
    hooks: {
      setSelect: [(u) => {
        const { left, width } = u.select;
        if (!view || width < 3) return;
        const lo = Math.max(0, Math.floor(u.posToVal(left, 'x')));
        const hi = Math.ceil(u.posToVal(left + width, 'x'));
        u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
        if (hi > lo) view.set({ range: [lo, hi] });
      }],
      ready: [(u) => view && u.over.addEventListener('dblclick', () => view.set({ range: null }))],
    },
  };
}

/** Each step with a non-finite figure (`marks`: step -> "NaN" | "+Inf" | "-Inf") as a thin red
 * line over the plot (a run of them: a band), labelled where a run starts. */
export function drawNonFiniteMarks(u, marks) {
  if (!marks.size) return;
  clippedToPlot(u, (ctx, { top, height }, r) => {
    ctx.textAlign = 'left'; // uPlot leaves its axis labels' alignment on the context
    let lastLabel = -Infinity;
    for (const [x, label] of [...marks].sort((p, q) => p[0] - q[0])) {
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
  });
}

/**
 * A live chart over steps. Each series folds its records into buckets of steps as they arrive, so a
 * draw costs (series x buckets), not (records). The buckets cover the whole run: when the run
 * outgrows MAX_POINTS buckets their width doubles and neighbours merge (sums add up; `latest` keeps
 * the later). Only `latest` series (state such as the period: few records) keep their raw records,
 * to fold again after a restore cuts their history.
 */
export class LiveChart {
  /** axes: y axes [{label, scale?, side?}]; markers(): [{x, label, color?}] drawn as dashed vertical lines;
   * minBucket: fewest steps per drawn point (rates need a few steps to mean something); view: the
   * page's ChartView (its range zooms this chart too). */
  constructor(el, { axes = [{ label: '' }], scales = {}, markers = null, legendMax = 16, minBucket = 1, view = null } = {}) {
    Object.assign(this, { el, axes, scales, markers, legendMax, minBucket, view });
    this.series = new Map();
    // Steps where a series' figure was NaN or infinite (step -> "NaN" | "+Inf" | "-Inf"): no point
    // can show them (uPlot would lose its scale), so each is a gap marked on the plot.
    this.nonFinite = new Map();
    this.minX = Infinity;
    this.maxX = -Infinity;
    this.w = minBucket; // steps per bucket: minBucket x a power of two
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
    if (!this.series.has(key)) this.series.set(key, { ...spec, xs: [], recs: [], agg: new Map() });
  }

  push(key, x, rec) {
    const s = this.series.get(key);
    if (s.reduce.latest) { s.xs.push(x); s.recs.push(rec); }
    this.fold(s, x, rec);
    if (x > this.maxX) this.maxX = x;
    if (x < this.minX) this.minX = x;
    this.invalidate();
  }

  // One record into its bucket: [sum of num, sum of den], or [k, the latest value].
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

  // Buckets twice as wide: bucket k goes into k >> 1 (a `latest` keeps the later of the two).
  widen() {
    this.w *= 2;
    for (const s of this.series.values()) {
      const merged = new Map();
      for (const k of [...s.agg.keys()].sort((a, b) => a - b)) {
        const v = s.agg.get(k);
        const into = Math.floor(k / 2);
        const cell = merged.get(into);
        if (s.reduce.latest || !cell) merged.set(into, s.reduce.latest ? v : [...v]);
        else { cell[0] += v[0]; cell[1] += v[1]; }
      }
      s.agg = merged;
    }
  }

  // Fold the raw records of the `latest` series again (the others keep no raw records).
  refold() {
    for (const s of this.series.values()) {
      if (!s.reduce.latest) continue;
      s.agg.clear();
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
    for (const s of this.series.values()) Object.assign(s, { xs: [], recs: [], agg: new Map() });
    this.nonFinite.clear();
    this.minX = Infinity;
    this.maxX = -Infinity;
    this.w = this.minBucket;
    this.invalidate();
  }

  /** Schedule a redraw: at most one per REDRAW_MS, in an animation frame. `refold`: what a series
   * shows changed (fold the records again and rebuild the plot). */
  invalidate(refold = false) {
    if (refold) { this.shape = ''; this.refoldNeeded = true; }
    scheduleDraw(this);
  }

  destroy() {
    this.dead = true;
    clearTimeout(this.timer);
    this.resize.disconnect();
    this.plot?.destroy();
    this.plot = null;
    // What draw() told scripts and tests about this chart goes with it (the element stays, for the next page).
    for (const key of ['points', 'nonFinite', 'series', 'medians', 'lasts', 'markers', 'markerLabels', 'range']) delete this.el.dataset[key];
  }

  size() {
    return { width: Math.max(200, this.el.clientWidth), height: HEIGHT };
  }

  draw() {
    if (this.dead || !Number.isFinite(this.maxX)) return;
    const hi = this.maxX;
    const lo = Number.isFinite(this.minX) ? Math.min(this.minX, hi) : hi;
    while ((hi - lo + 1) / this.w > MAX_POINTS) this.widen();
    const w = this.w;
    const all = [...this.series.values()].sort((a, b) => (a.z ?? 0) - (b.z ?? 0));
    if (this.refoldNeeded) {
      this.refoldNeeded = false;
      this.refold();
    }
    const k0 = Math.floor(lo / w);
    const n = Math.floor(hi / w) - k0 + 1;
    const xs = new Float64Array(n);
    for (let j = 0; j < n; j++) xs[j] = (k0 + j) * w;
    // The page's zoom, or the whole run.
    this.range = this.view?.range ? [...this.view.range] : [xs[0], Math.max(hi, xs[0] + 1)];
    let points = 0;
    const data = [xs, ...all.map((s) => {
      const ys = new Array(n).fill(null);
      let held = null;
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
    this.el.dataset.range = JSON.stringify(this.range);
    // What each series shows, in one number per series (its median point, its last), for scripts and tests.
    this.el.dataset.medians = JSON.stringify(Object.fromEntries(all.map((s, i) => [s.label, median(data[i + 1])])));
    this.el.dataset.lasts = JSON.stringify(Object.fromEntries(all.map((s, i) => [s.label, data[i + 1].findLast((y) => y !== null) ?? null])));
  }

  build(all, data, shape) {
    this.plot?.destroy();
    this.shape = shape;
    const zoom = zoomOptions(this.view);
    const opts = {
      ...this.size(),
      // Every chart shows the same range of steps, so their cursors line up.
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
      cursor: zoom.cursor,
      hooks: { ...zoom.hooks, draw: [(u) => this.drawMarkers(u), (u) => drawNonFiniteMarks(u, this.nonFinite)] },
    };
    this.plot = new uPlot(opts, data, this.el);
  }

  drawMarkers(u) {
    const marks = this.markers ? this.markers() : [];
    this.el.dataset.markers = String(marks.length);
    this.el.dataset.markerLabels = JSON.stringify(marks.map((m) => m.label));
    clippedToPlot(u, (ctx, { left, top, width, height }, r) => {
      ctx.lineWidth = r;
      ctx.setLineDash([4 * r, 4 * r]);
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
    });
  }
}
