// Which layers drift: a canvas heatmap of layers (rows, in model order) x rounds (columns) with
// each layer's share of one rank's divergence (GET .../layers). Models with more layers than the
// protocol's per-round cap send only their top layers each round: the rest are unknown, drawn
// blank, and the note says "top k of N layers".

import { getLayers } from './rest.js';
import { measured } from './charts.js';

const ROW_PX = 14;
const LABEL_PX = 180; // the layer names' gutter
const AXIS_PX = 22;
const REFRESH_MS = 10_000; // live rounds refresh the whole-run map at most this often
const UNKNOWN = '#eceff1';

// A white-to-dark-red ramp over [0, 1]: the map scales shares by its largest one, since with many
// layers every share is small (20 equal layers: 5% each) and a fixed scale would be all white.
const RAMP = [[255, 255, 255], [254, 224, 144], [253, 141, 60], [215, 48, 31], [127, 0, 0]];
export function shareColor(v) {
  const x = Math.min(1, Math.max(0, v)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  const c = RAMP[i].map((a, j) => Math.round(a + f * (RAMP[i + 1][j] - a)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

export class LayerHeatmap {
  /** canvas: the <canvas>; note: the element that says what the map holds; view: the page's ChartView
   * (its range, and its selected rank: whose shares are shown, rank 0 by default). */
  constructor(canvas, note, { jobId, view }) {
    Object.assign(this, { canvas, note, jobId, view });
    this.answer = null;
    this.seq = 0;
    this.timer = null;
    this.dead = false;
    this.canvas.onmousemove = (ev) => this.hover(ev);
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(canvas.parentElement);
  }

  load() {
    const seq = ++this.seq;
    const range = this.view.range;
    const width = this.canvas.parentElement.clientWidth - LABEL_PX;
    const rank = this.view.selected ?? 0;
    getLayers(this.jobId, { from: range?.[0], to: range?.[1], points: Math.min(200, Math.max(1, Math.floor(width / 3))), rank })
      .then((answer) => {
        if (seq !== this.seq || this.dead) return;
        this.answer = { ...answer, rank };
        delete this.canvas.dataset.error;
        this.draw();
      }, (err) => { if (seq === this.seq && !this.dead) this.canvas.dataset.error = err.message; });
  }

  /** A live round: ask again soon (the whole run only; a zoom on the past does not change). */
  noteRound() {
    if (this.view.range || this.timer !== null || this.dead) return;
    this.timer = setTimeout(() => { this.timer = null; this.load(); }, REFRESH_MS);
  }

  destroy() {
    this.dead = true;
    clearTimeout(this.timer);
    this.resize.disconnect();
    this.canvas.onmousemove = null;
    for (const key of Object.keys(this.canvas.dataset)) delete this.canvas.dataset[key];
    this.note.textContent = '';
  }

  // The cell under the mouse, as the canvas' title: layer, step and share.
  hover(ev) {
    const a = this.answer;
    if (!a || !a.steps.length) return;
    const box = this.canvas.getBoundingClientRect();
    const i = Math.floor((ev.clientY - box.top) / ROW_PX);
    const j = Math.floor((ev.clientX - box.left - LABEL_PX) / this.cellPx);
    const v = a.shares[i]?.[j];
    this.canvas.title = i >= 0 && i < a.layers.length && j >= 0 && j < a.steps.length
      ? `${a.layers[i]} at step ${a.steps[j]}: ${v === null || v === undefined ? 'not sent' : `${(v * 100).toFixed(1)}%`}`
      : '';
  }

  draw() {
    const a = this.answer;
    if (this.dead || !a) return;
    measured(this.canvas.id, () => this.paint(a));
  }

  paint(a) {
    const { canvas } = this;
    const width = Math.max(LABEL_PX + 50, canvas.parentElement.clientWidth);
    const height = Math.max(1, a.layers.length) * ROW_PX + AXIS_PX;
    const r = devicePixelRatio || 1;
    canvas.width = width * r;
    canvas.height = height * r;
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    const ctx = canvas.getContext('2d');
    ctx.scale(r, r);
    ctx.clearRect(0, 0, width, height);
    const n = a.steps.length;
    this.cellPx = n ? (width - LABEL_PX) / n : 1;
    ctx.font = '11px system-ui, sans-serif';
    ctx.textBaseline = 'middle';
    let top = 0;
    for (const row of a.shares) for (const v of row) if (typeof v === 'number' && Number.isFinite(v) && v > top) top = v;
    let known = 0;
    let most = 0; // the most layers known in one round: the k of "top k"
    const perColumn = new Array(n).fill(0);
    a.layers.forEach((name, i) => {
      ctx.fillStyle = '#1d232a';
      ctx.textAlign = 'right';
      ctx.fillText(name.length > 28 ? `…${name.slice(-27)}` : name, LABEL_PX - 6, i * ROW_PX + ROW_PX / 2);
      for (let j = 0; j < n; j++) {
        const v = a.shares[i]?.[j];
        const ok = typeof v === 'number' && Number.isFinite(v);
        if (ok) { known += 1; perColumn[j] += 1; }
        ctx.fillStyle = ok ? shareColor(top > 0 ? v / top : 0) : UNKNOWN;
        ctx.fillRect(LABEL_PX + j * this.cellPx, i * ROW_PX, Math.ceil(this.cellPx), ROW_PX - 1);
      }
    });
    for (const c of perColumn) most = Math.max(most, c);
    // The steps under the first, middle and last columns.
    ctx.fillStyle = '#66707a';
    ctx.textBaseline = 'top';
    const y = a.layers.length * ROW_PX + 4;
    for (const [j, align] of [[0, 'left'], [Math.floor(n / 2), 'center'], [n - 1, 'right']]) {
      if (j < 0 || j >= n) continue;
      ctx.textAlign = align;
      const x = LABEL_PX + (align === 'left' ? j : align === 'center' ? j + 0.5 : j + 1) * this.cellPx;
      ctx.fillText(`step ${a.steps[j]}`, x, y);
    }
    const total = a.layers_total ?? a.layers.length;
    const scale = `; darkest: ${(top * 100).toFixed(1)}%`;
    this.note.textContent = !n ? 'no rounds yet'
      : a.complete ? `rank ${a.rank}: all ${total} layers${scale}`
      : `rank ${a.rank}: top ${most} of ${total} layers per round (the others were not sent: blank)${scale}`;
    Object.assign(canvas.dataset, {
      layers: String(a.layers.length), columns: String(n), known: String(known),
      complete: a.complete ? '1' : '0', rank: String(a.rank), top: String(top), range: JSON.stringify([a.from_step, a.to_step]),
    });
  }
}
