// The page of one job: live charts fed by the job's websocket, the summary and the rank table.

import { getJob } from './rest.js';
import { LiveChart, latest, mean, rankColor, ratio } from './charts.js';
import { Controls } from './controls.js';
import { ago, el, num } from './format.js';
import { JobStream } from './stream.js';

const $ = (sel) => document.querySelector(sel);
const MAX_RANK_SERIES = 1024;

function makeCharts(isRelative, markers) {
  const divergence = new LiveChart($('#chart-divergence'), { axes: [{ label: 'divergence' }] });
  const pick = (abs, rel) => (r) => (isRelative() ? r[rel] : r[abs]);
  divergence.define('mean', { label: 'group mean', stroke: '#111', width: 2.5, z: 1, reduce: mean(pick('divergence_mean', 'relative_mean')) });
  divergence.define('max', { label: 'group max', stroke: '#c00', width: 2, dash: [6, 4], z: 1, reduce: mean(pick('divergence_max', 'relative_max')) });

  const period = new LiveChart($('#chart-period'), { axes: [{ label: 'period (steps)' }], markers });
  period.define('period', { label: 'period', stroke: '#5a3fa0', width: 2, stepped: true, reduce: latest((c) => c.period) });

  const throughput = new LiveChart($('#chart-throughput'), {
    axes: [{ label: 'steps/s per rank' }, { label: 'averaging share', scale: 'share', side: 1 }],
    scales: { share: { range: [0, 1] } },
    minBucket: 20,
  });
  // Steps per second of one rank, and the share of step time spent in averaging rounds (step
  // records bring the step time, round records the averaging seconds).
  throughput.define('rate', {
    label: 'steps/s', stroke: '#1565c0', width: 1.5, reduce: ratio((r) => (r.step_time > 0 ? 1 : null), (r) => r.step_time),
  });
  // A record of a thinned series stands for `w` records (a live frame's step_weight, a snapshot's
  // older records' w): sums of time count it w times, or the share would move with the thinning.
  throughput.define('share', {
    label: 'averaging share', stroke: '#e65100', width: 1.5, scale: 'share', max: 1,
    reduce: ratio((r) => (r.seconds ?? 0) * (r.w ?? 1), (r) => (r.seconds === undefined ? r.step_time * (r.w ?? 1) : 0)),
  });
  return {
    loss: new LiveChart($('#chart-loss'), { axes: [{ label: 'loss' }] }),
    divergence,
    drift: new LiveChart($('#chart-drift'), { axes: [{ label: 'drift' }] }),
    period,
    throughput,
  };
}

/** Open the page of job `jobId`; returns a function that closes it. */
export function openJobPage(jobId, { showError, setConnection }) {
  let job = null;
  let relative = false;
  const rankSteps = new Map(); // rank -> latest step seen in metrics (job messages may lag)
  // The server subscribes us before reading the snapshot, so the first live records of a rank
  // may repeat its tail: skip live records up to the snapshot's last step, per rank and kind.
  const overlap = { steps: new Map(), rounds: new Map() };
  const fresh = (kind, rank, step) => {
    const last = overlap[kind].get(rank);
    if (last === undefined) return true;
    if (step <= last) return false;
    overlap[kind].delete(rank);
    return true;
  };
  const controls = new Controls(jobId, { showError, onApplied: () => charts.period.invalidate() });
  const charts = makeCharts(() => relative, () => controls.markers());

  function ensureRank(rank) {
    const key = `r${rank}`;
    if (charts.loss.series.has(key) || charts.loss.series.size >= MAX_RANK_SERIES) return key;
    // Many ranks: lighter lines, so the group mean and max stay readable on top.
    const spec = { label: `rank ${rank}`, stroke: rankColor(rank, (job?.world_size ?? 0) > 16 ? 0.45 : 1) };
    charts.loss.define(key, { ...spec, reduce: mean((s) => s.loss) });
    charts.drift.define(key, { ...spec, reduce: mean((s) => s.drift) });
    charts.divergence.define(key, { ...spec, reduce: mean((r) => (relative ? r.relative_divergence : r.divergence)) });
    return key;
  }

  function feedStep(rank, s, weight = 1) {
    if (weight !== 1) s.w = weight;
    const key = ensureRank(rank);
    if (!charts.loss.series.has(key)) return;
    if (s.loss !== null && s.loss !== undefined) charts.loss.push(key, s.step, s);
    if (s.drift !== null && s.drift !== undefined) charts.drift.push(key, s.step, s);
    if (s.step_time > 0) {
      charts.throughput.push('rate', s.step, s);
      charts.throughput.push('share', s.step, s);
    }
    if (!(s.step <= rankSteps.get(rank))) rankSteps.set(rank, s.step);
    charts.period.extendTo(s.step);
  }

  function feedRound(rank, r) {
    const key = ensureRank(rank);
    if (charts.divergence.series.has(key)) charts.divergence.push(key, r.step, r);
    charts.divergence.push('mean', r.step, r);
    charts.divergence.push('max', r.step, r);
    charts.throughput.push('share', r.step, r);
  }

  function feedControl(ev) {
    if (!ev.control) return;
    charts.period.push('period', ev.step, ev.control);
    for (const size of Object.keys(ev.control.hierarchy || {})) {
      const key = `g${size}`;
      if (!charts.period.series.has(key)) {
        charts.period.define(key, { label: `groups of ${size}`, stroke: rankColor(Number(size) + 3), stepped: true, dash: [3, 3], reduce: latest((c) => c.hierarchy?.[size]) });
        charts.period.invalidate(true);
      }
      charts.period.push(key, ev.step, ev.control);
    }
  }

  function feedMetrics({ rank, steps, step_weight: weight = 1, rounds, control }) {
    for (const s of steps || []) if (fresh('steps', rank, s.step)) feedStep(rank, s, weight);
    for (const r of rounds || []) if (fresh('rounds', rank, r.step)) feedRound(rank, r);
    for (const ev of control || []) feedControl(ev);
  }

  function setJob(next) {
    if (!next || typeof next !== 'object') return;
    const before = job?.control?.version;
    job = next;
    // A control change the metrics did not carry (yet): show it from the job's step.
    if (job.control && before !== undefined && job.control.version > before) feedControl({ step: job.step ?? 0, control: job.control });
    if (typeof job.step === 'number') charts.period.extendTo(job.step);
    controls.setControl(job.control);
    render();
  }

  function onMessage(msg) {
    if (msg.kind === 'snapshot') {
      for (const chart of Object.values(charts)) chart.clear();
      rankSteps.clear();
      job = null;
      setJob(msg.job);
      for (let r = 0; r < Math.min(job?.world_size ?? 0, MAX_RANK_SERIES); r++) ensureRank(r);
      const steps = msg.steps || [];
      const events = msg.control_events || [];
      // Without recorded changes the period was the current one all along.
      if (!events.length && job?.control) {
        let first = job.step ?? 0;
        for (const s of steps) if (s.step < first) first = s.step;
        feedControl({ step: first, control: job.control });
      }
      for (const s of steps) feedStep(s.rank, s);
      for (const r of msg.rounds || []) feedRound(r.rank, r);
      for (const [kind, list] of [['steps', steps], ['rounds', msg.rounds || []]]) {
        overlap[kind].clear();
        for (const rec of list) if (!(rec.step <= overlap[kind].get(rec.rank))) overlap[kind].set(rec.rank, rec.step);
      }
      for (const ev of events) feedControl(ev);
      controls.reset(msg.commands || []);
    } else if (msg.kind === 'metrics_batch') {
      // One frame per job per server tick: every rank's records since the last one.
      for (const item of msg.items || []) feedMetrics(item);
      renderSoon();
    } else if (msg.kind === 'metrics') {
      feedMetrics(msg); // the per-rank frame of older servers
      renderSoon();
    } else if (msg.kind === 'job') {
      setJob(msg.job);
    } else if (msg.kind === 'command' && msg.command) {
      controls.upsert(msg.command);
    }
  }

  let renderTimer = null;
  function renderSoon() {
    if (renderTimer === null) renderTimer = setTimeout(() => { renderTimer = null; render(); }, 500);
  }

  function render() {
    if (!job) return;
    const c = job.control || {};
    const seen = Math.max(-1, ...rankSteps.values());
    const fields = [
      ['job', 'Job', job.id ?? jobId],
      ['status', 'Status', job.status ?? ''],
      ['world-size', 'World size', job.world_size ?? ''],
      ['step', 'Step', Math.max(job.step ?? 0, seen)],
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
    const rows = [...(job.ranks || [])].sort((a, b) => a.rank - b.rank).map((r) => {
      const tr = el('tr', {},
        el('td', { className: 'num', textContent: r.rank }),
        el('td', { textContent: r.host ?? '' }),
        el('td', { className: 'num', textContent: Math.max(r.step ?? 0, rankSteps.get(r.rank) ?? 0) }),
        el('td', { textContent: ago(r.last_seen) }),
        el('td', { className: r.connected ? 'yes' : 'no', textContent: r.connected ? 'yes' : 'no' }),
        el('td', { className: 'num', textContent: r.dropped ?? 0 }));
      tr.dataset.rank = r.rank;
      return tr;
    });
    $('#rank-table tbody').replaceChildren(...rows);
  }

  function onDrop() {
    // The browser hides why a websocket failed: ask REST (wrong token, unknown job, server down).
    getJob(jobId).then(setJob, (err) => showError(err.isAuth ? err.message : `Job ${jobId}: ${err.message}`));
  }

  const stream = new JobStream(jobId, {
    onMessage,
    onDrop,
    onState: (state, detail) => {
      setConnection(state, detail);
      if (state === 'connected') showError(null);
    },
  });
  const relativeBox = $('#divergence-relative');
  relative = relativeBox.checked;
  relativeBox.onchange = () => {
    relative = relativeBox.checked;
    charts.divergence.axes = [{ label: relative ? 'divergence / ‖mean model‖' : 'divergence' }];
    charts.divergence.invalidate(true);
  };
  getJob(jobId).then((j) => { if (!job) setJob(j); }, (err) => showError(err.isAuth ? err.message : `Job ${jobId}: ${err.message}`));
  stream.start();
  const ticker = setInterval(render, 2000); // keeps "last seen" ages fresh

  return () => {
    stream.stop();
    clearInterval(ticker);
    clearTimeout(renderTimer);
    relativeBox.onchange = null;
    controls.destroy();
    for (const chart of Object.values(charts)) chart.destroy();
    $('#job-summary').replaceChildren();
    $('#rank-table tbody').replaceChildren();
  };
}
