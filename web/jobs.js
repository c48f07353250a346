// The job list: GET /api/jobs every 2 s.

import { listJobs } from './rest.js';
import { $, el } from './dom.js';
import { ago, num } from './format.js';

const POLL_MS = 2000;

function row(job) {
  const c = job.control || {};
  const link = el('a', { href: `#/jobs/${encodeURIComponent(job.id)}`, textContent: job.id });
  const tr = el('tr', {},
    el('td', {}, link),
    el('td', { textContent: job.status ?? '' }),
    el('td', { className: 'num', textContent: job.world_size ?? '' }),
    el('td', { className: 'num', textContent: job.step ?? '' }),
    el('td', { className: 'num', textContent: c.hierarchy ? Object.values(c.hierarchy).join(' / ') : c.period ?? '' }),
    el('td', { textContent: c.averaging_paused ? 'paused' : 'running' }),
    el('td', { textContent: c.training_paused ? 'paused' : 'running' }),
    el('td', { className: 'num', textContent: num(job.divergence_mean) }),
    el('td', { className: 'num', textContent: num(job.divergence_max) }),
    // JobOut.last_seen is optional (no frame of the job recorded): then when its row last changed.
    el('td', { textContent: ago(job.last_seen ?? job.updated_at) }));
  tr.dataset.jobId = job.id;
  return tr;
}

/** Show the job list and keep it fresh; returns a function that stops it. */
export function openJobList({ showError }) {
  let stopped = false;
  let timer = null;
  async function refresh() {
    try {
      const jobs = await listJobs();
      if (stopped) return;
      showError(null);
      $('#job-table tbody').replaceChildren(...jobs.map(row));
      $('#jobs-empty').hidden = jobs.length > 0;
    } catch (err) {
      if (!stopped) showError(err.message);
    }
    if (!stopped) timer = setTimeout(refresh, POLL_MS);
  }
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    $('#job-table tbody').replaceChildren();
  };
}
