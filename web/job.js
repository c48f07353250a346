// The page of one job: charts of the job's history fed live by its websocket, the layer map, the
// summary and the rank table.

import { getJob } from './rest.js';
import { LiveChart, latest, mean, rankColor, ratio } from './charts.js';
import { Controls } from './controls.js';
import { $, el } from './dom.js';
import { nonFinite } from './figures.js';
import { num } from './format.js';
import { LayerHeatmap } from './heatmap.js';
import { HistoryChart } from './history.js';
import { RankTable } from './ranks.js';
import { ChartTools } from './tools.js';
import { JobStream } from './stream.js';
import { ChartView } from './view.js';

const MAX_RANKS = 1024; // ranks whose live records the charts keep (as many arrays each)
const RENDER_SOON_MS = 500; // live frames refresh the summary and rank table at most this often
const RENDER_EVERY_MS = 2000; // keeps "last seen" ages fresh
const STREAM_AFTER_MS = 3000; // the stream starts after the histories are in, or this long after opening

const RESTORE_COLOR = '#9a6700'; // a restore's marker on the period chart (style.css: --warn)

/** Raise map[key] to `step` unless it already holds that step or a later one. */
function keepLatest(map, key, step) {
  if (!(step <= map.get(key))) map.set(key, step);
}

/** The charts of a job page: the per-rank ones (loss, divergence, drift) read the job's history
 * and append live records; the others fold the snapshot's and the live records (charts.js). */
class JobCharts {
  /** relative: divergence shown relative to the mean model's norm; markers(): applied commands as
   * [{x, label}] (the period chart adds the restores, the outer lr chart shows them too);
   * view: the page's ChartView. */
  constructor(jobId, { relative, markers, view }) {
    this.relative = relative;
    this.view = view;
    const history = (id, name, axis, groupLines = false) => new HistoryChart($(id), { jobId, view, name, axis, groupLines });
    this.loss = history('#chart-loss', () => 'loss', () => 'loss');
    this.drift = history('#chart-drift', () => 'drift', () => 'drift');
    this.divergence = history('#chart-divergence', () => (this.relative ? 'relative_divergence' : 'divergence'),
      () => (this.relative ? 'divergence / ‖mean model‖' : 'divergence'), true);

    this.restores = []; // [{x, label}]: restores from checkpoints, marked beside the commands
    this.period = new LiveChart($('#chart-period'), { axes: [{ label: 'period (steps)' }], markers: () => [...markers(), ...this.restores], view });
    this.period.define('period', { label: 'period', stroke: '#5a3fa0', width: 2, stepped: true, reduce: latest((c) => c.period) });

    // DiLoCo: each round's pseudo-gradient Δ = θ_g − mean θ_i (one figure for the whole job, so the
    // ranks' records fold into one line) and the outer lr it was applied with. Shown for DiLoCo jobs.
    this.pseudoGradient = new LiveChart($('#chart-pseudo-gradient'), {
      axes: [{ label: '‖Δ‖' }, { label: '‖Δ‖ / ‖θ_g‖', scale: 'relative', side: 1 }], view,
    });
    this.pseudoGradient.define('norm', { label: '‖Δ‖', stroke: '#00695c', width: 2, reduce: mean((r) => r.pseudo_gradient_norm) });
    this.pseudoGradient.define('relative', {
      label: '‖Δ‖ / ‖θ_g‖', stroke: '#ad1457', width: 1.5, dash: [6, 4], scale: 'relative', reduce: mean((r) => r.pseudo_gradient_relative),
    });
    this.outerLr = new LiveChart($('#chart-outer-lr'), { axes: [{ label: 'outer lr' }], markers, view });
    this.outerLr.define('lr', { label: 'outer lr', stroke: '#6d4c41', width: 2, stepped: true, reduce: latest((r) => r.outer_lr) });

    this.throughput = new LiveChart($('#chart-throughput'), {
      axes: [{ label: 'steps/s per rank' }, { label: 'averaging share', scale: 'share', side: 1 }],
      scales: { share: { range: [0, 1] } },
      minBucket: 20,
      view,
    });
    // Steps per second of one rank, and the share of step time spent in averaging rounds (step
    // records bring the step time, round records the averaging seconds).
    this.throughput.define('rate', {
      label: 'steps/s', stroke: '#1565c0', width: 1.5, reduce: ratio((r) => (r.step_time > 0 ? 1 : null), (r) => r.step_time),
    });
    // A record of a thinned series stands for `w` records (a live frame's step_weight, a snapshot's
    // older records' w): sums of time count it w times, or the share would move with the thinning.
    this.throughput.define('share', {
      label: 'averaging share', stroke: '#e65100', width: 1.5, scale: 'share', max: 1,
      reduce: ratio((r) => (r.seconds ?? 0) * (r.w ?? 1), (r) => (r.seconds === undefined ? r.step_time * (r.w ?? 1) : 0)),
    });
  }

  history() {
    return [this.loss, this.divergence, this.drift];
  }

  live() {
    return [this.period, this.throughput, this.pseudoGradient, this.outerLr];
  }

  /** A step record of `rank` standing for `weight` steps; false past MAX_RANKS ranks. */
  addStep(rank, s, weight = 1) {
    if (weight !== 1) s.w = weight;
    if (!(rank >= 0 && rank < MAX_RANKS)) return false;
    if (s.loss !== null && s.loss !== undefined) this.loss.push(rank, s.step, s.loss);
    if (s.drift !== null && s.drift !== undefined) this.drift.push(rank, s.step, s.drift);
    if (s.step_time > 0) {
      this.throughput.push('rate', s.step, s);
      this.throughput.push('share', s.step, s);
    }
    this.period.extendTo(s.step);
    return true;
  }

  /** A round record of `rank`: its divergence, the group's mean and max, the time it took; a
   * DiLoCo round's pseudo-gradient and outer lr (rank 0's: every rank reports the same). */
  addRound(rank, r) {
    if (rank >= 0 && rank < MAX_RANKS) this.divergence.push(rank, r.step, this.relative ? r.relative_divergence : r.divergence);
    this.throughput.push('share', r.step, r);
    if (rank !== 0) return;
    if (r.pseudo_gradient_norm !== null && r.pseudo_gradient_norm !== undefined) {
      this.pseudoGradient.push('norm', r.step, r);
      this.pseudoGradient.push('relative', r.step, r);
    }
    if (typeof r.outer_lr === 'number') this.outerLr.push('lr', r.step, r);
  }

  /** A control event: the period from its step on, and each group level's for hierarchies. An
   * event with a `note` is the server's record of a restore from a checkpoint: the periods after
   * its step were undone, so they are dropped, and the event is marked on the chart. */
  addControl(ev) {
    if (!ev.control) return;
    if (ev.note) {
      for (const key of this.period.series.keys()) this.period.cutAfter(key, ev.step);
      this.restores.push({ x: ev.step, label: ev.note, color: RESTORE_COLOR });
    }
    this.period.push('period', ev.step, ev.control);
    if (typeof ev.control.outer_lr === 'number') this.outerLr.push('lr', ev.step, ev.control); // set_outer_lr applied
    for (const size of Object.keys(ev.control.hierarchy || {})) {
      const key = `g${size}`;
      if (!this.period.series.has(key)) {
        this.period.define(key, { label: `groups of ${size}`, stroke: rankColor(Number(size) + 3), stepped: true, dash: [3, 3], reduce: latest((c) => c.hierarchy?.[size]) });
        this.period.invalidate(true);
      }
      this.period.push(key, ev.step, ev.control);
    }
  }

  /** Show divergence relative to the mean model's norm, or not: its history is asked again. */
  setRelative(relative) {
    this.relative = relative;
    this.divergence.clear();
    this.divergence.load();
  }

  /** The view changed (view.js): a new range asks every history again; the rest redraws. */
  onView(changed) {
    if (changed.has('range')) for (const chart of this.history()) { chart.liveMax = -Infinity; chart.load(); }
    else if (changed.has('overlay')) for (const chart of this.history()) chart.loadOverlay();
    // (A change of scale or of the lines drawn rebuilds the plot: draw() compares their shape.)
    if (changed.has('log') || changed.has('smoothing') || changed.has('selected')) for (const chart of this.history()) chart.invalidate();
    if (changed.has('range')) for (const chart of this.live()) chart.invalidate(true);
  }

  /** Forget every record; `history`: also the histories' answers, asked again. */
  clear({ history = true } = {}) {
    this.restores = [];
    for (const chart of this.live()) chart.clear();
    if (history) for (const chart of this.history()) { chart.clear(); chart.load(); }
  }

  destroy() {
    for (const chart of [...this.history(), ...this.live()]) chart.destroy();
  }
}

/**
 * The server subscribes the page before it reads the snapshot, so the first live records of a rank
 * may repeat the snapshot's tail: live records up to the snapshot's last step are skipped, per
 * rank and kind (`steps`, `rounds`).
 */
class SnapshotOverlap {
  constructor() {
    this.lastStep = { steps: new Map(), rounds: new Map() };
  }

  /** Remember the snapshot's last step of each rank among its `records` of `kind`. */
  reset(kind, records) {
    this.lastStep[kind].clear();
    for (const rec of records) keepLatest(this.lastStep[kind], rec.rank, rec.step);
  }

  /** Whether a live record is past the snapshot; the first that is ends the check for its rank. */
  isNew(kind, rank, step) {
    const last = this.lastStep[kind].get(rank);
    if (last === undefined) return true;
    if (step <= last) return false;
    this.lastStep[kind].delete(rank);
    return true;
  }
}

const STEP_FIGURES = ['loss', 'drift', 'step_time'];
const ROUND_FIGURES = [
  'divergence', 'relative_divergence', 'divergence_mean', 'divergence_max', 'relative_mean', 'relative_max', 'seconds',
  'pseudo_gradient_norm', 'pseudo_gradient_relative',
];
const MAX_BANNER_RANKS = 8;

/**
 * Which figures were NaN or infinite, on which ranks, from which step: what a person needs to see
 * first when a run diverges (the charts can only leave gaps there). Rendered as the banner
 * #nonfinite-banner, one line per group of figures with the same ranks and first step.
 */
class NonFiniteFigures {
  constructor() {
    this.figures = new Map(); // name -> {ranks: Set, first: step}
  }

  clear() {
    this.figures.clear();
  }

  /** Note the non-finite ones among `names` of `rec` (and its scalars) for `rank`. */
  note(rank, rec, names) {
    for (const name of names) if (nonFinite(rec[name])) this.add(name, rank, rec.step);
    for (const [name, v] of Object.entries(rec.scalars || {})) if (nonFinite(v)) this.add(name, rank, rec.step);
  }

  add(name, rank, step) {
    const f = this.figures.get(name);
    if (!f) this.figures.set(name, { ranks: new Set([rank]), first: step });
    else {
      f.ranks.add(rank);
      if (step < f.first) f.first = step;
    }
  }

  /** "divergence and divergence_mean are not finite on ranks 0, 1 since step 7", one per group. */
  lines() {
    const groups = new Map();
    for (const [name, f] of this.figures) {
      const ranks = [...f.ranks].sort((a, b) => a - b);
      const key = `${ranks.join(',')}@${f.first}`;
      if (!groups.has(key)) groups.set(key, { names: [], ranks, first: f.first });
      groups.get(key).names.push(name);
    }
    return [...groups.values()].sort((a, b) => a.first - b.first).map(({ names, ranks, first }) => {
      const who = names.length > 1 ? `${names.slice(0, -1).join(', ')} and ${names.at(-1)} are` : `${names[0]} is`;
      const shown = ranks.slice(0, MAX_BANNER_RANKS).join(', ') + (ranks.length > MAX_BANNER_RANKS ? `, … (${ranks.length} ranks)` : '');
      return `${who} not finite on rank${ranks.length > 1 ? 's' : ''} ${shown} since step ${first}`;
    });
  }
}

/** The summary of `job` (dd ids: job-<key>, see app.js); `step`: the latest step seen. */
function renderSummary(job, step) {
  const c = job.control || {};
  const fields = [
    ['job', 'Job', job.id],
    ['status', 'Status', job.status ?? ''],
    ['world-size', 'World size', job.world_size ?? ''],
    ['averager', 'Averager', job.config?.kind ?? null],
    ['step', 'Step', step],
    ['period', 'Period', c.period ?? ''],
    ['warmup', 'Warm-up', c.warmup_steps ?? ''],
    ['averaging', 'Averaging', c.averaging_paused ? 'paused' : 'running'],
    ['training', 'Training', c.training_paused ? 'paused' : 'running'],
    ['hierarchy', 'Hierarchy', c.hierarchy ? Object.entries(c.hierarchy).map(([g, p]) => `groups of ${g}: ${p}`).join(', ') : null],
    ['autopilot', 'Autopilot', c.autotune?.enabled ? `on${c.autotune.target_divergence ? ` (target ${num(c.autotune.target_divergence)})` : ''}` : 'off'],
    ['version', 'Control version', c.version ?? ''],
  ];
  $('#job-summary').replaceChildren(...fields.filter(([, , v]) => v !== null).map(([key, label, value]) =>
    el('div', {}, el('dt', { textContent: label }), el('dd', { textContent: String(value), id: `job-${key}` }))));
}

/** One open job page: the job's stream feeds its charts, controls, summary and rank table. */
class JobPage {
  constructor(jobId, { limits, role, showError, setConnection }) {
    this.jobId = jobId;
    this.showError = showError;
    this.job = null;
    this.rankSteps = new Map(); // rank -> latest step seen in metrics (job messages may lag)
    this.overlap = new SnapshotOverlap();
    this.notFinite = new NonFiniteFigures();
    this.banner = el('div', { id: 'nonfinite-banner', className: 'banner-warn', hidden: true });
    this.banner.setAttribute('role', 'status');
    $('#job-summary').before(this.banner);
    this.renderTimer = null;
    this.controls = new Controls(jobId, {
      limits, role, showError, onApplied: () => { this.charts.period.invalidate(); this.charts.outerLr.invalidate(); },
    });
    this.relativeBox = $('#divergence-relative');
    this.view = new ChartView();
    this.charts = new JobCharts(jobId, { relative: this.relativeBox.checked, markers: () => this.controls.markers(), view: this.view });
    this.relativeBox.onchange = () => this.charts.setRelative(this.relativeBox.checked);
    this.layers = new LayerHeatmap($('#chart-layers'), $('#layers-note'), { jobId, view: this.view });
    this.rankTable = new RankTable(this.view);
    this.tools = new ChartTools(jobId, this.view, this.charts, showError);
    this.stopView = this.view.listen((changed) => {
      this.charts.onView(changed);
      if (changed.has('range') || changed.has('selected')) this.layers.load();
    });
    this.stream = new JobStream(jobId, {
      onMessage: (msg) => this.onMessage(msg),
      onDrop: () => this.onDrop(),
      onState: (state, detail) => {
        setConnection(state, detail);
        if (state === 'connected') showError(null);
      },
    });
    getJob(jobId).then((job) => { if (!this.job) this.setJob(job); }, (err) => this.explain(err));
    this.snapshots = 0;
    // The histories first, the stream (its snapshot) after them: a large job's snapshot read beside
    // them made the server answer each 3-4x slower (bench/dashboard.py). Not for long, though.
    const histories = Promise.allSettled(this.charts.history().map((chart) => chart.load()));
    this.layers.load();
    const later = new Promise((resolve) => { this.startTimer = setTimeout(resolve, STREAM_AFTER_MS); });
    Promise.race([histories, later]).then(() => { if (!this.closed) this.stream.start(); });
    this.ticker = setInterval(() => this.render(), RENDER_EVERY_MS);
  }

  close() {
    this.closed = true;
    clearTimeout(this.startTimer);
    this.stream.stop();
    clearInterval(this.ticker);
    clearTimeout(this.renderTimer);
    this.relativeBox.onchange = null;
    this.stopView();
    this.tools.destroy();
    this.rankTable.destroy();
    this.layers.destroy();
    this.controls.destroy();
    this.charts.destroy();
    this.banner.remove();
    $('#job-summary').replaceChildren();
    for (const sel of ['#figure-pseudo-gradient', '#figure-outer-lr']) $(sel).hidden = true;
  }

  onMessage(msg) {
    if (msg.kind === 'snapshot') this.onSnapshot(msg);
    else if (msg.kind === 'metrics_batch') this.onMetricsBatch(msg);
    else if (msg.kind === 'job') this.setJob(msg.job);
    else if (msg.kind === 'command') this.controls.upsert(msg.command);
    else if (msg.kind === 'control_event') this.charts.addControl(msg.event); // a restore, from the server
  }

  // Sent on every (re)connect: everything shown starts again from it.
  onSnapshot(msg) {
    // The histories were asked for when the page opened (not after the snapshot: a large job's takes
    // a second); a later snapshot is a reconnect, after which they are asked again.
    const again = this.snapshots++ > 0;
    this.charts.clear({ history: again });
    if (!again) for (const chart of this.charts.history()) if (chart.failed) chart.load();
    this.rankSteps.clear();
    this.notFinite.clear();
    this.job = null;
    this.setJob(msg.job);
    if (this.snapshots > 1) this.layers.load();
    const steps = msg.steps || [];
    const rounds = msg.rounds || [];
    const events = msg.control_events || [];
    // Without recorded changes the period was the current one all along.
    if (!events.length && this.job?.control) {
      let first = this.job.step ?? 0;
      for (const s of steps) if (s.step < first) first = s.step;
      this.charts.addControl({ step: first, control: this.job.control });
    }
    for (const s of steps) this.addStep(s.rank, s);
    for (const r of rounds) this.addRound(r.rank, r);
    this.overlap.reset('steps', steps);
    this.overlap.reset('rounds', rounds);
    for (const ev of events) this.charts.addControl(ev);
    this.controls.reset(msg.commands || []);
    this.render(); // the rank table with the snapshot's latest figures (setJob rendered before them)
  }

  // One frame per job per server tick (`DashboardMetrics`): every rank's records since the last one.
  onMetricsBatch(msg) {
    for (const { rank, steps, step_weight: weight, rounds, control } of msg.items) {
      for (const s of steps) if (this.overlap.isNew('steps', rank, s.step)) this.addStep(rank, s, weight);
      for (const r of rounds) if (this.overlap.isNew('rounds', rank, r.step)) this.addRound(rank, r);
      for (const ev of control) this.charts.addControl(ev);
    }
    this.renderSoon();
  }

  addStep(rank, s, weight = 1) {
    this.notFinite.note(rank, s, STEP_FIGURES);
    if (this.charts.addStep(rank, s, weight)) keepLatest(this.rankSteps, rank, s.step);
    if (s.loss !== null && s.loss !== undefined) this.rankTable.note(rank, s.step, 'loss', s.loss);
  }

  addRound(rank, r) {
    this.notFinite.note(rank, r, ROUND_FIGURES);
    this.charts.addRound(rank, r);
    this.rankTable.note(rank, r.step, 'divergence', r.divergence);
    this.layers.noteRound();
    if (rank === 0) this.controls.noteRound(r);
  }

  renderBanner() {
    const lines = this.notFinite.lines();
    this.banner.replaceChildren(...lines.map((line) => el('div', { textContent: line })));
    this.banner.hidden = !lines.length;
  }

  setJob(next) {
    if (!next || typeof next !== 'object') return;
    const before = this.job?.control?.version;
    this.job = next;
    // A control change the metrics did not carry (yet): show it from the job's step.
    if (next.control && before !== undefined && next.control.version > before) this.charts.addControl({ step: next.step ?? 0, control: next.control });
    if (typeof next.step === 'number') this.charts.period.extendTo(next.step);
    this.controls.setControl(next.control, next.config);
    // DiLoCo's charts, for DiLoCo jobs only (their averager's kind, as rank 0's hello named it).
    $('#figure-pseudo-gradient').hidden = !this.controls.diloco;
    $('#figure-outer-lr').hidden = !this.controls.diloco;
    this.render();
  }

  onDrop() {
    // The browser hides why a websocket failed: ask REST (wrong token, unknown job, server down).
    getJob(this.jobId).then((job) => this.setJob(job), (err) => this.explain(err));
  }

  explain(err) {
    this.showError(err.isAuth ? err.message : `Job ${this.jobId}: ${err.message}`);
  }

  renderSoon() {
    if (this.renderTimer === null) this.renderTimer = setTimeout(() => { this.renderTimer = null; this.render(); }, RENDER_SOON_MS);
  }

  render() {
    if (!this.job) return;
    const seen = Math.max(-1, ...this.rankSteps.values());
    renderSummary(this.job, Math.max(this.job.step ?? 0, seen));
    this.rankTable.update(this.job.ranks || [], this.rankSteps, this.job.world_size ?? 0);
    this.renderBanner();
  }
}

/** Open the page of job `jobId`; returns a function that closes it. `limits`: GET /api/limits, or
 * null; `role`: the token's (GET /api/session), or null when unknown. */
export function openJobPage(jobId, { limits, role, showError, setConnection }) {
  const page = new JobPage(jobId, { limits, role, showError, setConnection });
  return () => page.close();
}
