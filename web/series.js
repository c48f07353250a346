// Pure helpers over history answers (GET .../series): smoothing, the ranks furthest from the group,
// the live tail's buckets, CSV. Numbers in, numbers out: no DOM, no fetches.

const finite = (v) => typeof v === 'number' && Number.isFinite(v);

/** The median of the finite values of `vs`, or null. */
export function median(vs) {
  const v = vs.filter(finite).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

/**
 * TensorBoard's smoothing: an exponential moving average, debiased so that the first points are not
 * pulled towards zero (TensorBoard's `vz_line_chart2` resmoothDataset). `weight` in [0, 1): 0 leaves
 * `ys` as it is. Gaps (null, non-finite) stay gaps and do not reset the average.
 */
export function ema(ys, weight) {
  if (!(weight > 0)) return ys;
  const out = new Array(ys.length);
  let last = 0;
  let n = 0;
  for (let i = 0; i < ys.length; i++) {
    const y = ys[i];
    if (!finite(y)) { out[i] = y; continue; }
    last = last * weight + (1 - weight) * y;
    n += 1;
    out[i] = last / (1 - weight ** n);
  }
  return out;
}

/** For a log scale: values <= 0 have no place on it, so they become gaps. */
export const positive = (ys) => ys.map((y) => (finite(y) && y > 0 ? y : null));

/**
 * The `k` ranks whose means lie furthest from the group's median: the mean over buckets of
 * |rank mean - median| / (the bucket's max - min), so that buckets with a wide spread (early
 * training) do not outweigh the rest. `ranks`: {rank: means[]}; `med`, `lo`, `hi`: the group's.
 */
export function furthest(ranks, med, lo, hi, k) {
  const scored = [];
  for (const [rank, means] of Object.entries(ranks)) {
    let sum = 0;
    let n = 0;
    for (let j = 0; j < means.length; j++) {
      const y = means[j];
      if (!finite(y) || !finite(med[j])) continue;
      const spread = hi[j] - lo[j];
      sum += spread > 0 ? Math.abs(y - med[j]) / spread : 0;
      n += 1;
    }
    if (n) scored.push([Number(rank), sum / n]);
  }
  return scored.sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, k).map(([rank]) => rank);
}

/**
 * Live records past a history answer, folded into buckets on the answer's width from `origin` on:
 * per rank and bucket the mean and count of the values (what a chart draws; the CSV asks the API),
 * in typed arrays that grow by doubling, so a record costs O(1), 256 ranks x 1,300 buckets hold
 * about 4 MB, and a draw reads only the ranks it draws. The group's figures of a bucket are
 * computed again only when a record went into it since the last read.
 */
export class Tail {
  constructor(origin, width) {
    Object.assign(this, { origin, width });
    this.length = 0; // buckets, from `origin` on
    this.capacity = 64;
    this.records = new Uint32Array(this.capacity); // records per bucket (any rank): empty ones are not drawn
    this.filled = 0; // buckets that hold a record
    this.ranks = new Map(); // rank -> {mean: Float64Array, n: Uint32Array}
    this.group = { min: [], median: [], max: [] };
    this.dirty = new Set(); // buckets whose group figures are stale
    this.nonFinite = new Map(); // step -> the non-finite value
  }

  grow(length) {
    let cap = this.capacity;
    while (cap < length) cap *= 2;
    if (cap !== this.capacity) {
      const wider = (a) => { const b = new a.constructor(cap); b.set(a); return b; };
      this.records = wider(this.records);
      for (const c of this.ranks.values()) { c.mean = wider(c.mean); c.n = wider(c.n); }
      this.capacity = cap;
    }
    for (const a of Object.values(this.group)) while (a.length < length) a.push(null);
    this.length = length;
  }

  add(rank, step, v) {
    if (!finite(v)) {
      if (typeof v === 'number' && !this.nonFinite.has(step)) this.nonFinite.set(step, v);
      return;
    }
    const j = Math.floor((step - this.origin) / this.width);
    if (j < 0) return;
    if (j >= this.length) this.grow(j + 1);
    let c = this.ranks.get(rank);
    if (!c) this.ranks.set(rank, (c = { mean: new Float64Array(this.capacity), n: new Uint32Array(this.capacity) }));
    c.n[j] += 1;
    c.mean[j] += (v - c.mean[j]) / c.n[j];
    if (!this.records[j]++) this.filled += 1;
    this.dirty.add(j);
  }

  /** The buckets that hold a record, and their first steps. */
  shown() {
    const idx = [];
    for (let j = 0; j < this.length; j++) if (this.records[j]) idx.push(j);
    return { idx, steps: idx.map((j) => this.origin + j * this.width) };
  }

  /** `rank`'s means in the buckets `idx` (null where it has no record), or null for a rank with none. */
  means(rank, idx) {
    const c = this.ranks.get(rank);
    return c ? idx.map((j) => (c.n[j] ? c.mean[j] : null)) : null;
  }

  /** The group's min, median and max over the ranks' means, in the buckets `idx`. */
  groupAt(idx) {
    for (const j of this.dirty) {
      const means = [];
      for (const c of this.ranks.values()) if (c.n[j]) means.push(c.mean[j]);
      this.group.min[j] = means.length ? Math.min(...means) : null;
      this.group.max[j] = means.length ? Math.max(...means) : null;
      this.group.median[j] = median(means);
    }
    this.dirty.clear();
    const pick = (a) => idx.map((j) => a[j]);
    return { min: pick(this.group.min), median: pick(this.group.median), max: pick(this.group.max) };
  }

  get size() { return this.filled; }
}

const cell = (v) => (v === null || v === undefined ? '' : Number.isNaN(v) ? 'NaN' : v === Infinity ? 'Infinity' : v === -Infinity ? '-Infinity' : String(v));

/** An answer as CSV: step, then each rank's min, mean and max, then the group's min, median and max
 * (an empty cell where a bucket had no record; non-finite figures spelled as the API spells them). */
export function csvText(answer) {
  const ranks = Object.keys(answer.ranks).sort((a, b) => Number(a) - Number(b));
  const head = ['step'];
  const cols = [];
  for (const r of ranks) for (const f of ['min', 'mean', 'max']) { head.push(`rank ${r} ${f}`); cols.push(answer.ranks[r][f]); }
  for (const f of ['min', 'median', 'max']) { head.push(`group ${f}`); cols.push(answer.group[f]); }
  const lines = [head.join(',')];
  answer.steps.forEach((step, j) => lines.push([step, ...cols.map((c) => cell(c[j]))].join(',')));
  return lines.join('\n') + '\n';
}
