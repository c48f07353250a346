// Small formatting helpers shared by the job list and the job page.

import { nonFinite, spell } from './figures.js';

/** Time since `t` (unix seconds, as the server sends every time) as "3 s ago"; "" when unknown. */
export function ago(t) {
  if (typeof t !== 'number') return '';
  const s = Math.max(0, Date.now() / 1000 - t);
  if (!Number.isFinite(s)) return '';
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

/** A number for a table cell: integers as they are, others to `digits` significant digits, a
 * non-finite figure as "NaN", "+Inf" or "-Inf" (data, not a blank). */
export function num(x, digits = 4) {
  if (nonFinite(x)) return spell(x);
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return '';
  const v = Number(x);
  return Number.isInteger(v) ? String(v) : v.toPrecision(digits);
}

/** A clock time ("14:03:27") of unix seconds `t`; "" when unknown. */
export function clockTime(t) {
  return typeof t === 'number' && Number.isFinite(t) ? new Date(t * 1000).toLocaleTimeString() : '';
}
