// Non-finite figures are data. JSON has no number for NaN, +Inf or -Inf, so the server writes them
// as the strings "NaN", "Infinity" and "-Infinity" (as the wire protocol does); every message and
// answer the page reads passes through `parseJson` (stream.js, rest.js), which turns those strings
// back into numbers where a figure is, and nowhere else (a host or job named "NaN" stays a name).

const SPELLED = new Map([['NaN', NaN], ['Infinity', Infinity], ['-Infinity', -Infinity]]);

// Fields that hold figures: step and round records (protocol StepRecord, RoundRecord), a job's
// divergence, the autopilot's report. A record's `scalars` and `top_layers` hold figures too, and so
// do the arrays of a history answer (GET .../series: min, mean, max, median; .../layers: shares).
const FIGURES = new Set([
  'time', 'step_time', 'drift', 'loss',
  'divergence', 'relative_divergence', 'divergence_mean', 'divergence_max', 'relative_mean', 'relative_max', 'seconds',
  'pseudo_gradient_norm', 'pseudo_gradient_relative', 'outer_lr',
  'target_divergence', 'calibrated_target', 'delta', 'growth', 'target', 'raw_period',
]);

const number = (v) => (typeof v === 'string' && SPELLED.has(v) ? SPELLED.get(v) : v);
const SERIES_ARRAYS = new Set(['min', 'mean', 'max', 'median']);

function revive(key, value) {
  if (FIGURES.has(key)) return number(value);
  if (key === 'scalars' && value && typeof value === 'object' && !Array.isArray(value)) {
    for (const name of Object.keys(value)) value[name] = number(value[name]);
  } else if (key === 'top_layers' && Array.isArray(value)) {
    for (const pair of value) if (Array.isArray(pair)) pair[1] = number(pair[1]);
  } else if (SERIES_ARRAYS.has(key) && Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = number(value[i]);
  } else if (key === 'shares' && Array.isArray(value)) {
    for (const row of value) if (Array.isArray(row)) for (let i = 0; i < row.length; i++) row[i] = number(row[i]);
  }
  return value;
}

/** JSON.parse with the server's non-finite figures as numbers (NaN, Infinity, -Infinity). */
export function parseJson(text) {
  // Only a diverged job's text holds the strings: everything else parses at JSON.parse's own speed.
  return text.includes('NaN"') || text.includes('Infinity"') ? JSON.parse(text, revive) : JSON.parse(text);
}

/** A number that is NaN or infinite (not null, not a string). */
export const nonFinite = (v) => typeof v === 'number' && !Number.isFinite(v);

/** How the page writes a non-finite figure: "NaN", "+Inf", "-Inf". */
export const spell = (v) => (Number.isNaN(v) ? 'NaN' : v > 0 ? '+Inf' : '-Inf');
