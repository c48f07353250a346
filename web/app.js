// avgctl dashboard: routing between the job list (#/) and a job page (#/jobs/<id>).
//
// Stable element ids for tests and scripts:
//   #error                 page-wide problem (e.g. missing or wrong token); hidden when fine
//   #connection-state      job websocket: data-state = connecting | connected | reconnecting | closed
//   #jobs-view, #job-table (rows tr[data-job-id]), #jobs-empty
//   #job-view, #job-summary (dd ids: #job-status, #job-step, #job-period, #job-averaging,
//       #job-training, #job-autopilot, #job-version, #job-world-size, #job-warmup, #job-hierarchy)
//   controls: #period-input, #set-period, #period-error, #pause-averaging, #resume-averaging,
//       #pause-training, #resume-training, #average-now, #hierarchy-controls,
//       #hierarchy-input-<group size>, #set-hierarchy, #hierarchy-error, #autopilot-state,
//       #autopilot-target, #autopilot-on, #autopilot-off, #autopilot-error, #command-error;
//       #controls[data-read-only] and #controls-read-only when the token is a read token
//   #nonfinite-banner      which figures were NaN or infinite, on which ranks, since which step
//   charts (data-points = drawn values, data-series, data-markers on #chart-period,
//       data-non-finite = steps whose figure was NaN or infinite, drawn as red marks):
//       #chart-loss, #chart-divergence (+ #divergence-relative), #chart-drift, #chart-period,
//       #chart-throughput; the per-rank charts (history.js) also say data-band (1: the group's
//       band and its furthest ranks, data-outliers), data-range ([from, to] drawn), data-bucket-steps,
//       data-log, data-labels (the legend's)
//   #chart-tools: #zoom-range, #zoom-reset, #log-scale, #smoothing, #rank-pick, #compare-job;
//       #csv-loss, #csv-divergence, #csv-drift (a chart's series as CSV)
//   #chart-layers (canvas: data-layers, data-columns, data-known, data-complete), #layers-note
//   #rank-table (rows tr[data-rank], tr[aria-selected] for the selected rank; th[data-key][data-sort]
//       sorts), #command-log (rows tr[data-command-id][data-status])

import { $ } from './dom.js';
import { openJobPage } from './job.js';
import { openJobList } from './jobs.js';
import { getLimits, getSession } from './rest.js';

// Fetched once per page load: the bounds are constants of the server. Without them (no token, no
// server: the views say so) inputs are checked without upper bounds and the server has the say.
const limits = await getLimits().catch(() => null);
// The token's role, also once: a read token sees the controls disabled (the server would refuse
// them). Unknown (no token, an older server): the controls stay on and the server has the say.
const role = await getSession().then((s) => s.role, () => null);
let close = null;

function showError(message) {
  $('#error').textContent = message || '';
  $('#error').hidden = !message;
}

function setConnection(state, detail = '') {
  const node = $('#connection-state');
  node.hidden = state === 'idle';
  node.dataset.state = state;
  node.textContent = detail ? `${state} (${detail})` : state;
}

function route() {
  close?.();
  close = null;
  showError(null);
  setConnection('idle');
  const match = location.hash.match(/^#\/jobs\/([^/]+)$/);
  $('#jobs-view').hidden = !!match;
  $('#job-view').hidden = !match;
  if (match) {
    const id = decodeURIComponent(match[1]);
    $('#crumb').textContent = `/ job ${id}`;
    document.title = `${id} · avgctl`;
    close = openJobPage(id, { limits, role, showError, setConnection });
  } else {
    $('#crumb').textContent = '';
    document.title = 'avgctl';
    close = openJobList({ showError });
  }
}

addEventListener('unhandledrejection', (ev) => showError(`Dashboard error: ${ev.reason?.message ?? ev.reason}`));
addEventListener('hashchange', route);
route();
