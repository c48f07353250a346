// Small formatting helpers shared by the job list and the job page.

/** Unix seconds from a number (unix seconds) or an ISO string; NaN when unknown. */
export function toSeconds(t) {
  if (typeof t === 'number') return t;
  return typeof t === 'string' ? Date.parse(t) / 1000 : NaN;
}

/** Time since `t` as "3 s ago"; "" when unknown. */
export function ago(t) {
  const s = Math.max(0, Date.now() / 1000 - toSeconds(t));
  if (!Number.isFinite(s)) return '';
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

export function num(x, digits = 4) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return '';
  const v = Number(x);
  return Number.isInteger(v) ? String(v) : v.toPrecision(digits);
}

/** Build an element: el('td', {className: 'num'}, 'text', child, ...). */
export function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

/** The job's divergence when the server reports one (field names vary; tolerate them all). */
export function jobDivergence(job) {
  const d = job.divergence ?? job.divergence_mean ?? job.last_round?.divergence_mean ?? job.metrics?.divergence_mean;
  return typeof d === 'object' && d !== null ? d.mean ?? null : d;
}

/** When the server last heard of the job (unix seconds), or NaN. */
export function lastSeen(job) {
  if (Number.isFinite(toSeconds(job.last_seen))) return toSeconds(job.last_seen); // latest frame from any rank
  const times = [job.last_seen, job.updated_at, ...(job.ranks || []).map((r) => r.last_seen)].map(toSeconds).filter(Number.isFinite);
  return times.length ? Math.max(...times) : NaN;
}
