// The REST client: the only way the dashboard acts on a job. Same-origin fetches carry the
// HttpOnly `avgctl_token` cookie the server set when the user opened /?token=...

import { parseJson } from './figures.js';

/** A non-2xx answer (status 0: the server could not be reached). */
export class ApiError extends Error {
  constructor(status, message, body = null) {
    super(message);
    this.status = status;
    this.body = body;
  }
  get isAuth() { return this.status === 401 || this.status === 403; }
}

export const AUTH_MESSAGE =
  'Missing or wrong token: open the URL printed by `avgctl serve` / `avgctl demo`, which includes ?token=';

// FastAPI puts the reason in `detail`: a string, or a list of validation errors.
function reasonOf(body, fallback) {
  const detail = body && typeof body === 'object' ? body.detail : body;
  if (typeof detail === 'string' && detail) return detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join('; ');
  return fallback;
}

export async function api(path, { method = 'GET', body } = {}) {
  const init = { method, credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `The avgctl server cannot be reached (${err.message}).`);
  }
  const text = await res.text();
  let data = text;
  try { data = text ? parseJson(text) : null; } catch { /* keep the text */ }
  if (!res.ok) {
    const err = new ApiError(res.status, reasonOf(data, `${res.status} ${res.statusText}`), data);
    if (res.status === 401) err.message = AUTH_MESSAGE;
    if (res.status === 403) err.message = `${AUTH_MESSAGE} (the server said: ${err.message})`;
    throw err;
  }
  return data;
}

/** The bounds the server enforces on commands and records (GET /api/limits, `LimitsOut`). */
export const getLimits = () => api('/api/limits');

/** What this page's token may do: {role: 'control' | 'read'} (GET /api/session). */
export const getSession = () => api('/api/session');

const job = (id) => `/api/jobs/${encodeURIComponent(id)}`;
export const listJobs = () => api('/api/jobs');
export const getJob = (id) => api(job(id));
export const listCommands = (id) => api(`${job(id)}/commands`);
export const getCommand = (id, cid) => api(`${job(id)}/commands/${encodeURIComponent(cid)}`);
export const sendCommand = (id, command) => api(`${job(id)}/commands`, { method: 'POST', body: command });

/** Query string of the defined entries of `params` (null and undefined are left out). */
const query = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined)).toString();

/** A figure's history bucketed to at most `points` buckets (GET .../series, CONTRACT "History at any zoom"):
 * {name, from_step, to_step, bucket_steps, steps, ranks: {r: {min, mean, max}}, group: {min, median, max}}. */
export const seriesPath = (id, { name, from, to, points, ranks }) =>
  `${job(id)}/series?${query({ name, from_step: from, to_step: to, points, ranks: ranks?.join(',') })}`;
export const getSeries = (id, opts) => api(seriesPath(id, opts));

/** Each layer's share of one rank's divergence per round (GET .../layers):
 * {from_step, to_step, layers, steps, shares: [[share per column] per layer], layers_total, complete}. */
export const getLayers = (id, { from, to, points, rank }) =>
  api(`${job(id)}/layers?${query({ from_step: from, to_step: to, points, rank })}`);
