// A per-rank chart read from the server's history (GET .../series): the whole run, or the page's
// zoom, at about one bucket per pixel; live records append at the right edge as more buckets on
// the answer's width (series.js Tail) until the run outgrows the answer, which is then asked again.
// Above BAND_ABOVE ranks the chart draws the group's band (min to max of the ranks' means), its
// median and the OUTLIERS ranks furthest from it instead of every rank.

import uPlot from '/vendor/uplot/uPlot.esm.js';
import { HEIGHT, defined, drawNonFiniteMarks, median, rankColor, scheduleDraw, zoomOptions } from './charts.js';
import { spell } from './figures.js';
import { getSeries } from './rest.js';
import { csvText, ema, furthest, positive, Tail } from './series.js';

export const BAND_ABOVE = 16; // ranks; more than this and a chart draws a band, not a line per rank
const OUTLIERS = 3;
const OUTLIERS_MS = 2000;
const RETRY_MS = 2000; // a failed answer is asked again at most this often
const MAX_PENDING = 200_000; // live records held while an answer is on its way
const BAND_FILL = 'rgba(60, 90, 140, 0.16)';

const finite = (v) => typeof v === 'number' && Number.isFinite(v);

// One history request at a time: the server answers each in its own thread, and three at once
// (with the connection's snapshot) took 2.2 s where one after the other took 0.3 s each (256
// ranks x 100k steps, bench/dashboard.py).
let line = Promise.resolve();
function inTurn(ask) {
  const turn = line.then(ask, ask);
  line = turn.catch(() => {});
  return turn;
}

const nulls = (n) => new Array(n).fill(null);

/** The last step of the answer's last bucket that holds a record (-1: none does). */
function lastRecorded(answer) {
  for (let j = answer.steps.length - 1; j >= 0; j--) {
    for (const r of Object.values(answer.ranks)) {
      if (r.mean[j] !== null) return Math.min(answer.to_step, answer.steps[j] + answer.bucket_steps - 1);
    }
  }
  return -1;
}

export class HistoryChart {
  /** name(): the series' name in the API (it may change, e.g. divergence -> relative_divergence);
   * axis(): the y axis' label; groupLines: draw the group's mean and max over the rank lines too. */
  constructor(el, { jobId, view, name, axis, groupLines = false }) {
    Object.assign(this, { el, jobId, view, name, axis, groupLines });
    this.answer = null;
    this.tail = null;
    this.cut = -1; // live records up to this step are in the answer
    this.seen = -Infinity; // the latest step pushed (live or from the snapshot)
    this.asked = -Infinity; // `seen` when the answer on its way was asked for
    this.pending = [];
    this.overlay = null; // the overlaid job's answer
    this.outliers = [];
    this.outliersAt = -Infinity;
    this.outlierTimer = null;
    this.failed = false; // or when the last answer failed (performance.now())
    this.seq = 0;
    this.loading = false;
    this.liveMax = -Infinity;
    this.plot = null;
    this.shape = '';
    this.timer = null;
    this.lastDraw = 0;
    this.drawMs = 0;
    this.dead = false;
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(el);
  }

  /** Buckets to ask for: one per pixel of the chart's width. */
  points() {
    return Math.min(5000, Math.max(1, Math.round(this.el.clientWidth || 600)));
  }

  query() {
    const range = this.view.range;
    return { name: this.name(), from: range?.[0], to: range?.[1], points: this.points() };
  }

  /** Ask for the answer behind what the chart shows now (and the overlay's); live records that
   * arrive meanwhile wait in `pending`. Returns a promise settled when the answer is in (or not). */
  load() {
    const seq = ++this.seq;
    const q = this.query();
    this.asked = this.seen;
    this.loading = true;
    this.el.dataset.loading = '1';
    const asked = inTurn(() => (seq === this.seq && !this.dead ? getSeries(this.jobId, q) : null)).then((answer) => {
      if (seq !== this.seq || this.dead) return;
      this.loading = false;
      this.failed = false;
      delete this.el.dataset.loading;
      delete this.el.dataset.error;
      this.setAnswer(answer);
    }, (err) => {
      if (seq !== this.seq || this.dead) return;
      this.loading = false;
      this.failed = performance.now(); // asked again by the next snapshot or live record (e.g. a job not known yet)
      delete this.el.dataset.loading;
      this.el.dataset.error = err.message;
    });
    this.loadOverlay();
    return asked;
  }

  loadOverlay() {
    const other = this.view.overlay;
    this.overlay = null;
    if (!other) { this.invalidate(true); return; }
    const seq = this.seq;
    inTurn(() => getSeries(other, this.query())).then((answer) => {
      if (seq !== this.seq || this.dead || this.view.overlay !== other) return;
      this.overlay = { job: other, answer };
      this.invalidate(true);
    }, (err) => { this.el.dataset.overlayError = err.message; });
  }

  setAnswer(answer) {
    this.answer = answer;
    const width = Math.max(1, answer.bucket_steps || 1);
    // The answer holds the records seen before it was asked for (its to_step is its last bucket's
    // end, which the run may not have reached): the tail starts after them, on the answer's width.
    // Asked before any record was seen (the page opening): after the answer's last bucket with a
    // record, so at worst that bucket's mean stays over its first steps until the next answer.
    this.cut = Number.isFinite(this.asked) ? Math.min(answer.to_step, this.asked) : lastRecorded(answer);
    this.tail = new Tail(this.cut + 1, width);
    const pending = this.pending;
    this.pending = [];
    for (const [rank, step, v] of pending) this.push(rank, step, v);
    this.updateOutliers(); // (and the answer's columns, once: base())
    this.invalidate(true);
  }

  /** A live record: `rank`'s value `v` at `step`. */
  push(rank, step, v) {
    if (step > this.seen) this.seen = step;
    if (this.failed && !this.loading && performance.now() - this.failed > RETRY_MS) this.load();
    if (!this.answer || this.loading) {
      if (this.pending.length < MAX_PENDING) this.pending.push([rank, step, v]);
      return;
    }
    if (step <= this.cut) return;
    const range = this.view.range;
    if (range && step > range[1]) return; // zoomed on the past: the tail is not on show
    this.tail.add(rank, step, v);
    if (step > this.liveMax) this.liveMax = step;
    // The run outgrew the answer (about twice as many buckets as pixels): ask again, coarser.
    if (!range && this.answer.steps.length + this.tail.size > 2 * this.points()) this.load();
    this.invalidate();
  }

  /** A new connection: forget everything (and load() again). */
  clear() {
    this.seq += 1; // an answer on its way is for what went before
    this.answer = null;
    this.tail = null;
    this.pending = [];
    this.liveMax = -Infinity;
    this.seen = -Infinity;
  }

  invalidate(rebuild = false) {
    if (rebuild) this.shape = '';
    scheduleDraw(this);
  }

  destroy() {
    this.dead = true;
    clearTimeout(this.timer);
    clearTimeout(this.outlierTimer);
    this.resize.disconnect();
    this.plot?.destroy();
    this.plot = null;
    for (const key of Object.keys(this.el.dataset)) delete this.el.dataset[key];
  }

  size() {
    return { width: Math.max(200, this.el.clientWidth), height: HEIGHT };
  }

  /** The answer's columns, once per answer: each rank's means, the group's figures, and the
   * buckets with a non-finite figure (gaps, marked in red) taken out of them. */
  base() {
    if (this.cached?.answer === this.answer) return this.cached;
    const a = this.answer;
    const marks = new Map();
    const scrub = (ys) => ys.map((y, j) => {
      if (typeof y === 'number' && !Number.isFinite(y)) {
        if (!marks.has(a.steps[j])) marks.set(a.steps[j], spell(y));
        return null;
      }
      return y;
    });
    const means = new Map(Object.entries(a.ranks).map(([r, cols]) => [Number(r), scrub(cols.mean)]));
    this.cached = { answer: a, means, lo: scrub(a.group.min), med: scrub(a.group.median), hi: scrub(a.group.max), marks };
    return this.cached;
  }

  /** Which ranks lie furthest from the median; true if that changed. It reads every rank, so it
   * runs when an answer arrives and then at most every OUTLIERS_MS in a task of its own, never
   * inside a draw (256 ranks: 10-30 ms). */
  updateOutliers() {
    this.outliersAt = performance.now();
    const tab = this.table();
    const next = tab.ids.length > BAND_ABOVE
      ? furthest(Object.fromEntries(tab.ids.map((r) => [r, tab.ys(r)])), tab.med, tab.lo, tab.hi, OUTLIERS) : [];
    const changed = next.join() !== this.outliers.join();
    this.outliers = next;
    return changed;
  }

  /** The answer and the live tail as one table: {xs, n, ranks (ids), ys(rank), lo, med, hi, marks}. */
  table() {
    const b = this.base();
    const na = this.answer.steps.length;
    const { idx, steps } = this.tail.shown();
    const g = this.tail.groupAt(idx);
    const ids = new Set(b.means.keys());
    for (const r of this.tail.ranks.keys()) ids.add(r);
    const ys = (r) => [...(b.means.get(r) ?? nulls(na)), ...(this.tail.means(r, idx) ?? nulls(idx.length))];
    const marks = new Map(b.marks);
    for (const [step, v] of this.tail.nonFinite) if (!marks.has(step)) marks.set(step, spell(v));
    return {
      xs: [...this.answer.steps, ...steps], ids: [...ids].sort((x, y) => x - y), ys,
      lo: [...b.lo, ...g.min], med: [...b.med, ...g.median], hi: [...b.hi, ...g.max], marks,
    };
  }

  /** The series to draw: [{label, ys, stroke, width?, dash?}], and the band's pair of indexes. */
  lines(tab) {
    const selected = this.view.selected;
    const out = [];
    let band = null;
    this.band = tab.ids.length > BAND_ABOVE;
    if (!this.band) {
      const all = tab.ids.map((r) => [r, tab.ys(r)]);
      for (const [r, ys] of all) {
        const on = selected === null || selected === r;
        out.push({ label: `rank ${r}`, ys, stroke: rankColor(r, on ? 1 : 0.25), width: selected === r ? 3 : 1 });
      }
      if (this.groupLines) {
        const meanOf = tab.xs.map((_, j) => {
          let sum = 0;
          let n = 0;
          for (const [, ys] of all) if (finite(ys[j])) { sum += ys[j]; n += 1; }
          return n ? sum / n : null;
        });
        out.push({ label: 'group mean', ys: meanOf, stroke: '#111', width: 2.5 });
        out.push({ label: 'group max', ys: tab.hi, stroke: '#c00', width: 2, dash: [6, 4] });
      }
      this.outliers = [];
    } else {
      out.push({ label: 'group max', ys: tab.hi, stroke: 'rgba(60, 90, 140, 0.5)' });
      out.push({ label: 'group min', ys: tab.lo, stroke: 'rgba(60, 90, 140, 0.5)' });
      band = [1, 2];
      out.push({ label: 'group median', ys: tab.med, stroke: '#111', width: 2 });
      if (performance.now() - this.outliersAt > OUTLIERS_MS && this.outlierTimer === null) {
        this.outlierTimer = setTimeout(() => {
          this.outlierTimer = null;
          if (!this.dead && this.updateOutliers()) this.invalidate();
        });
      }
      for (const r of this.outliers) out.push({ label: `rank ${r} (furthest)`, ys: tab.ys(r), stroke: rankColor(r), width: selected === r ? 3 : 1.5 });
      if (selected !== null && !this.outliers.includes(selected)) {
        out.push({ label: `rank ${selected} (selected)`, ys: tab.ys(selected), stroke: rankColor(selected), width: 3 });
      }
    }
    return { out, band };
  }

  draw() {
    if (this.dead || !this.answer) return;
    const tab = this.table();
    const { out, band } = this.lines(tab);
    let data = [tab.xs, ...out.map((s) => s.ys)];
    if (this.overlay) {
      // The other job's median, on its own steps: joined onto ours (gaps where either has none).
      const o = this.overlay.answer;
      out.push({ label: `${this.overlay.job} (median)`, stroke: '#555', width: 1.5, dash: [5, 4] });
      data = uPlot.join([data, [o.steps, o.group.median.map((y) => (finite(y) ? y : null))]]);
    }
    const { smoothing, log } = this.view;
    data = [data[0], ...data.slice(1).map((ys) => {
      const s = ema(ys, smoothing);
      return log ? positive(s) : s;
    })];
    const xs = data[0];
    const range = this.view.range;
    const last = Math.max(xs.length ? xs[xs.length - 1] : 0, this.liveMax, this.answer.to_step ?? 0);
    this.range = range ? [...range] : [this.answer.from_step ?? xs[0] ?? 0, Math.max(last, (xs[0] ?? 0) + 1)];
    this.marks = tab.marks;
    const shape = out.map((s) => `${s.label}:${s.width}`).join('|') + `|${this.axis()}|${log}|${band}`;
    if (!this.plot || shape !== this.shape) this.build(out, data, band, shape);
    else this.plot.setData(data);
    let points = 0;
    for (const ys of data.slice(1)) for (const y of ys) if (y !== null && y !== undefined) points += 1;
    const ds = this.el.dataset;
    ds.points = String(points);
    ds.series = String(out.length);
    ds.band = this.band ? '1' : '0';
    ds.outliers = JSON.stringify(this.outliers);
    ds.range = JSON.stringify(this.range);
    ds.bucketSteps = String(this.answer.bucket_steps);
    ds.nonFinite = String(tab.marks.size);
    ds.log = log ? '1' : '0';
    ds.yDistr = String(this.plot.scales.y.distr);
    ds.steps = JSON.stringify(xs.length ? [xs[0], xs[xs.length - 1]] : []);
    ds.labels = JSON.stringify(out.map((s) => s.label));
    ds.medians = JSON.stringify(Object.fromEntries(out.map((s, i) => [s.label, median(data[i + 1])])));
    ds.lasts = JSON.stringify(Object.fromEntries(out.map((s, i) => [s.label, data[i + 1].findLast((y) => y !== null && y !== undefined) ?? null])));
  }

  build(out, data, band, shape) {
    this.plot?.destroy();
    this.shape = shape;
    const zoom = zoomOptions(this.view);
    const opts = {
      ...this.size(),
      scales: { x: { time: false, range: () => this.range }, y: this.view.log ? { distr: 3, log: 10 } : {} },
      axes: [{ label: 'step' }, { label: this.axis(), scale: 'y' }],
      series: [{ label: 'step' }, ...out.map((s) => defined({ label: s.label, stroke: s.stroke, width: s.width ?? 1, dash: s.dash, spanGaps: true }))],
      bands: band ? [{ series: band, fill: BAND_FILL }] : [],
      legend: { show: out.length <= 16 },
      cursor: zoom.cursor,
      hooks: { ...zoom.hooks, draw: [(u) => drawNonFiniteMarks(u, this.marks)] },
    };
    this.plot = new uPlot(opts, data, this.el);
  }

  /** Download what the chart shows as CSV: the API's answer for the chart's range and width now. */
  async download() {
    const q = this.query();
    const answer = await getSeries(this.jobId, q);
    const blob = new Blob([csvText(answer)], { type: 'text/csv' });
    const a = Object.assign(document.createElement('a'), {
      href: URL.createObjectURL(blob),
      download: `${this.jobId}-${q.name}-${answer.from_step}-${answer.to_step}.csv`,
    });
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }
}
