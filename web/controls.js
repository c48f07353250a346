// Controls and the command log. Every action is a POST to the REST API; the log follows each
// command from pending to applied/rejected via websocket `command` messages, with polling as fallback.

import { getCommand, sendCommand } from './rest.js';
import { $, el } from './dom.js';
import { clockTime, num } from './format.js';

const LOG_ROWS = 200;
const POLL_MS = 2500;

const ERRORS = ['#period-error', '#hierarchy-error', '#outer-lr-error', '#autopilot-error', '#command-error'];

const SIMPLE = [
  ['pause-averaging', 'pause_averaging'],
  ['resume-averaging', 'resume_averaging'],
  ['pause-training', 'pause_training'],
  ['resume-training', 'resume_training'],
  ['average-now', 'average_now'],
];

/** A whole number of steps in [1, maxPeriod] (no upper bound when maxPeriod is null), or null. */
function parsePeriod(raw, maxPeriod) {
  if (!/^\d+$/.test(raw)) return null;
  const n = Number(raw);
  return n >= 1 && (maxPeriod === null || n <= maxPeriod) ? n : null;
}

/** What a command of the log (`CommandOut`) asks for, in words. */
export function describe(cmd) {
  const b = cmd.command;
  switch (b.type) {
    case 'set_period': return `set period to ${b.period}`;
    case 'set_hierarchy': return `set periods ${Object.entries(b.periods || {}).map(([g, p]) => `groups of ${g}: ${p}`).join(', ')}`;
    case 'set_outer_lr': return `set outer lr to ${b.lr}`;
    case 'set_autotune': return b.enabled ? `autopilot on (target ${b.target_divergence ?? 'calibrated'})` : 'autopilot off';
    default: return String(b.type || '?').replaceAll('_', ' ');
  }
}

function shortLabel(cmd) {
  const b = cmd.command;
  if (b.type === 'set_period') return `period ${b.period}`;
  if (b.type === 'set_outer_lr') return `outer lr ${b.lr}`;
  return String(b.type).replaceAll('_', ' ');
}

/** Whether a restore from a checkpoint undid this applied command (its status stays "applied"). */
const rolledBack = (cmd) => typeof cmd.rolled_back_at_step === 'number';

function statusText(cmd) {
  if (cmd.status === 'applied') {
    const applied = cmd.applied_step === null || cmd.applied_step === undefined ? 'applied' : `applied at step ${cmd.applied_step}`;
    return rolledBack(cmd) ? `${applied}, rolled back at step ${cmd.rolled_back_at_step} (restored from checkpoint)` : applied;
  }
  if (cmd.status === 'rejected') return `rejected: ${cmd.reason || 'no reason given'}`;
  return cmd.status;
}

const READ_ONLY_TITLE = 'Needs a control token: this page holds a read token, which may look but not send commands.';

export class Controls {
  /** limits: the server's bounds (GET /api/limits), or null when they could not be read; role: the
   * token's (GET /api/session): 'read' disables every control, since the server would refuse them. */
  constructor(jobId, { limits, role = null, showError, onApplied }) {
    Object.assign(this, { jobId, showError, onApplied });
    this.readOnly = role === 'read';
    this.maxPeriod = limits?.max_period ?? null;
    this.maxTarget = limits?.max_target_divergence ?? null;
    this.maxOuterLr = limits?.max_outer_lr ?? null;
    this.diloco = false; // the job's averager is DiLoCo: its outer lr can be set
    this.roundOuterLr = null; // {lr, step}: the outer lr the latest DiLoCo round reported
    this.commands = new Map();
    this.control = null;
    this.renderTimer = null;
    $('#set-period').onclick = () => this.setPeriod();
    $('#period-input').onkeydown = (e) => { if (e.key === 'Enter') this.setPeriod(); };
    for (const [id, type] of SIMPLE) $(`#${id}`).onclick = () => this.send({ type }, '#command-error');
    $('#set-hierarchy').onclick = () => this.setHierarchy();
    $('#set-outer-lr').onclick = () => this.setOuterLr();
    $('#outer-lr-input').onkeydown = (e) => { if (e.key === 'Enter') this.setOuterLr(); };
    $('#autopilot-on').onclick = () => this.setAutotune(true);
    $('#autopilot-off').onclick = () => this.setAutotune(false);
    this.poller = setInterval(() => this.pollPending(), POLL_MS);
    $('#controls').toggleAttribute('data-read-only', this.readOnly);
    $('#controls-read-only').hidden = !this.readOnly;
    this.applyRole();
  }

  /** With a read token, every button and input of the panel is disabled and says why. */
  applyRole() {
    if (!this.readOnly) return;
    for (const node of document.querySelectorAll('#controls button, #controls input')) {
      node.disabled = true;
      node.title = READ_ONLY_TITLE;
    }
  }

  destroy() {
    clearInterval(this.poller);
    clearTimeout(this.renderTimer);
    for (const id of ['set-period', 'set-hierarchy', 'set-outer-lr', 'autopilot-on', 'autopilot-off', ...SIMPLE.map(([i]) => i)]) $(`#${id}`).onclick = null;
    $('#period-input').onkeydown = null;
    $('#outer-lr-input').onkeydown = null;
    $('#outer-lr-controls').hidden = true; // the next job's page shows it again if it is DiLoCo
    $('#command-log tbody').replaceChildren();
    for (const sel of ERRORS) $(sel).hidden = true;
  }

  /** Show the buttons that make sense for the job's control state; `config`: how its averager was
   * built (GET /api/jobs/{id}'s config: its `kind`), or null when the server has none. */
  setControl(control, config = null) {
    if (!control) return;
    this.control = control;
    this.diloco = config?.kind === 'diloco' || typeof control.outer_lr === 'number';
    $('#outer-lr-controls').hidden = !this.diloco;
    this.renderOuterLr();
    $('#pause-averaging').hidden = !!control.averaging_paused;
    $('#resume-averaging').hidden = !control.averaging_paused;
    $('#pause-training').hidden = !!control.training_paused;
    $('#resume-training').hidden = !control.training_paused;
    $('#period-input').placeholder = String(control.period ?? '');
    this.renderAutopilot(control.autotune);
    const sizes = Object.keys(control.hierarchy || {}).sort((a, b) => a - b);
    $('#hierarchy-controls').hidden = !sizes.length;
    const box = $('#hierarchy-inputs');
    if (box.dataset.sizes !== sizes.join(',')) {
      box.dataset.sizes = sizes.join(',');
      box.replaceChildren(...sizes.map((g) => {
        const input = el('input', { id: `hierarchy-input-${g}`, type: 'text', inputMode: 'numeric', size: 5, autocomplete: 'off' });
        input.dataset.groupSize = g;
        return el('label', {}, `groups of ${g} `, input);
      }));
    }
    for (const g of sizes) $(`#hierarchy-input-${g}`).placeholder = String(control.hierarchy[g]);
    this.applyRole(); // the hierarchy's inputs are new
  }

  // Show or clear an inline problem; true when there is one (and nothing must be sent).
  invalid(inputs, errSel, problem) {
    for (const input of inputs) input.setAttribute('aria-invalid', problem ? 'true' : 'false');
    $(errSel).textContent = problem || '';
    $(errSel).hidden = !problem;
    return !!problem;
  }

  /** The periods the server accepts, in words for the error messages. */
  periodRange() {
    return this.maxPeriod === null ? 'of at least 1' : `from 1 to ${this.maxPeriod}`;
  }

  setPeriod() {
    const input = $('#period-input');
    const raw = input.value.trim();
    const period = parsePeriod(raw, this.maxPeriod);
    let problem = period === null ? `Period must be a whole number of steps ${this.periodRange()} (got "${raw}"). Nothing was sent.` : null;
    const h = this.control?.hierarchy;
    const sizes = Object.keys(h || {}).sort((a, b) => a - b);
    if (!problem && sizes.length > 1 && period <= h[sizes.at(-2)]) {
      problem = `Period must be larger than ${h[sizes.at(-2)]}, the period of groups of ${sizes.at(-2)}; use the per-group periods to retune every level. Nothing was sent.`;
    }
    if (this.invalid([input], '#period-error', problem)) return;
    this.send({ type: 'set_period', period }, '#period-error');
  }

  setHierarchy() {
    const inputs = [...document.querySelectorAll('#hierarchy-inputs input')];
    const levels = inputs.map((input) => {
      const raw = input.value.trim() || input.placeholder;
      return { size: Number(input.dataset.groupSize), raw, period: parsePeriod(raw, this.maxPeriod) };
    }).sort((a, b) => a.size - b.size);
    let problem = null;
    const bad = levels.find((l) => l.period === null);
    if (bad) problem = `The period for groups of ${bad.size} must be a whole number of steps ${this.periodRange()} (got "${bad.raw}").`;
    for (let i = 1; !problem && i < levels.length; i++) {
      const [a, b] = [levels[i - 1], levels[i]];
      if (b.period <= a.period) problem = `Periods must grow with the group size: groups of ${b.size} (every ${b.period} steps) must average less often than groups of ${a.size} (every ${a.period} steps).`;
    }
    if (this.invalid(inputs, '#hierarchy-error', problem && `${problem} Nothing was sent.`)) return;
    this.send({ type: 'set_hierarchy', periods: Object.fromEntries(levels.map((l) => [String(l.size), l.period])) }, '#hierarchy-error');
  }

  /** A DiLoCo round's record: the outer lr it ran with (shown until a set_outer_lr applies). */
  noteRound(r) {
    if (typeof r.outer_lr !== 'number' || (this.roundOuterLr && r.step < this.roundOuterLr.step)) return;
    this.roundOuterLr = { lr: r.outer_lr, step: r.step };
    if (this.diloco) this.renderOuterLr();
  }

  // The outer lr in force: what a set_outer_lr set (the control state), else the latest round's.
  renderOuterLr() {
    const set = this.control?.outer_lr;
    const round = this.roundOuterLr;
    const value = $('#outer-lr-value');
    if (typeof set === 'number') {
      value.textContent = num(set);
      value.title = 'set by a set_outer_lr command';
    } else if (round) {
      value.textContent = num(round.lr);
      value.title = `the outer optimizer's own, at the round of step ${round.step}`;
    } else {
      value.textContent = '-';
      value.title = "the outer optimizer's own (no round reported yet)";
    }
    $('#outer-lr-input').placeholder = value.textContent === '-' ? '' : value.textContent;
  }

  setOuterLr() {
    const input = $('#outer-lr-input');
    const raw = input.value.trim();
    const lr = /^[+]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(raw) ? Number(raw) : NaN;
    const ok = Number.isFinite(lr) && lr > 0 && (this.maxOuterLr === null || lr <= this.maxOuterLr);
    const range = this.maxOuterLr === null ? 'above 0' : `above 0 and at most ${this.maxOuterLr}`;
    if (this.invalid([input], '#outer-lr-error', ok ? null : `Outer lr must be a finite number ${range} (got "${raw}"). Nothing was sent.`)) return;
    this.send({ type: 'set_outer_lr', lr }, '#outer-lr-error');
  }

  setAutotune(enabled) {
    const input = $('#autopilot-target');
    const raw = input.value.trim();
    const target = raw === '' ? null : Number(raw);
    const ok = !enabled || target === null || (Number.isFinite(target) && target > 0 && (this.maxTarget === null || target <= this.maxTarget));
    if (this.invalid([input], '#autopilot-error', ok ? null : `Target divergence must be a positive number (or empty to calibrate it), got "${raw}". Nothing was sent.`)) return;
    this.send({ type: 'set_autotune', enabled, target_divergence: enabled ? target : null }, '#autopilot-error');
  }

  async send(command, errSel) {
    for (const sel of ERRORS) $(sel).hidden = true;
    try {
      this.upsert(await sendCommand(this.jobId, command));
    } catch (err) {
      if (err.isAuth) this.showError(err.message);
      $(errSel).textContent = `Not accepted: ${err.message}`;
      $(errSel).hidden = false;
    }
  }

  reset(list) {
    this.commands.clear();
    for (const cmd of list) this.upsert(cmd);
    this.renderSoon();
  }

  upsert(cmd) {
    if (!cmd || cmd.id === undefined) return;
    const old = this.commands.get(cmd.id);
    this.commands.set(cmd.id, { ...old, ...cmd });
    const undone = rolledBack(cmd) && !(old && rolledBack(old)); // a restore rolled it back just now
    if ((cmd.status !== 'pending' && old?.status !== cmd.status) || undone) this.onApplied();
    this.renderSoon();
  }

  /** Applied commands as chart markers at their applied step (those a restore undid say so). */
  markers() {
    return [...this.commands.values()]
      .filter((c) => c.status === 'applied' && typeof c.applied_step === 'number')
      .map((c) => ({ x: c.applied_step, label: rolledBack(c) ? `${shortLabel(c)} (rolled back)` : shortLabel(c) }));
  }

  async pollPending() {
    const pending = [...this.commands.values()].filter((c) => c.status === 'pending').slice(-20);
    for (const c of pending) {
      try { this.upsert(await getCommand(this.jobId, c.id)); } catch { return; }
    }
  }

  // The autopilot's own report: its state, why, and its latest proposal (server/autotune.py).
  renderAutopilot(a) {
    const state = a.state ?? (a.enabled ? 'on' : 'off');
    $('#autopilot-state').textContent = a.target_divergence || a.calibrated_target
      ? `${state} (target ${num(a.target_divergence ?? a.calibrated_target)}${a.target_divergence ? '' : ', calibrated'})`
      : state;
    const box = $('#autopilot-proposal');
    const p = a.last_proposal;
    const lines = [];
    if (a.note) lines.push(a.note);
    if (p) {
      lines.push(`Last proposal at step ${p.step}: period ${p.current} → ${p.period} (δ ${num(p.delta)}, growth ${num(p.growth)}/step)`);
      if (p.communication_bound) lines.push(`Communication-bound: periods under ${p.tau_cost} spend more than the allowed share of time averaging.`);
    }
    box.hidden = !lines.length;
    box.replaceChildren(...lines.map((t) => el('div', { textContent: t })));
    if (p?.reason) box.title = p.reason;
  }

  renderSoon() {
    if (this.renderTimer === null) this.renderTimer = setTimeout(() => { this.renderTimer = null; this.render(); }, 50);
  }

  render() {
    const rows = [...this.commands.values()].sort((a, b) => b.id - a.id).slice(0, LOG_ROWS).map((c) => {
      const tr = el('tr', {},
        el('td', { className: 'num', textContent: c.id }),
        el('td', { textContent: describe(c), title: c.note ?? '' }, ...(c.note ? [el('div', { className: 'note', textContent: c.note })] : [])),
        el('td', { textContent: c.author ?? '' }),
        el('td', { textContent: clockTime(c.created_at) }),
        el('td', { className: `status status-${rolledBack(c) ? 'rolled-back' : c.status}`, textContent: statusText(c) }));
      tr.dataset.commandId = c.id;
      tr.dataset.status = c.status;
      if (rolledBack(c)) tr.dataset.rolledBackAtStep = c.rolled_back_at_step;
      return tr;
    });
    $('#command-log tbody').replaceChildren(...rows);
  }
}
