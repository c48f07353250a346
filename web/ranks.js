// The rank table (sorted by any column: click its header; again for the other order) and the rank
// picker: selecting a rank in either highlights it in every chart (the page's ChartView).

import { $, el } from './dom.js';
import { measured } from './charts.js';
import { ago, num } from './format.js';

// [key, header, value to sort by, cell text, numeric?]; `r`: a JobOut rank with `seen` (the latest
// step seen in metrics), `loss` and `divergence` (the latest seen) added.
const COLUMNS = [
  ['rank', 'Rank', (r) => r.rank, (r) => r.rank, true],
  ['host', 'Host', (r) => r.host ?? '', (r) => r.host ?? '', false],
  ['step', 'Step', (r) => r.seen, (r) => r.seen, true],
  ['loss', 'Loss', (r) => r.loss, (r) => num(r.loss), true],
  ['divergence', 'Divergence', (r) => r.divergence, (r) => num(r.divergence), true],
  ['last-seen', 'Last seen', (r) => -(r.last_seen ?? -Infinity), (r) => ago(r.last_seen), false],
  ['connected', 'Connected', (r) => (r.connected ? 1 : 0), (r) => (r.connected ? 'yes' : 'no'), false],
  ['dropped', 'Dropped batches', (r) => r.dropped ?? 0, (r) => r.dropped ?? 0, true],
];

// Unknown (undefined, null, NaN) sorts last in either order.
const known = (v) => v !== null && v !== undefined && !Number.isNaN(v);

export class RankTable {
  constructor(view) {
    this.view = view;
    this.sort = { key: 'rank', dir: 1 };
    this.latest = new Map(); // rank -> {loss, divergence}
    this.ranks = [];
    this.rows = new Map(); // rank -> its <tr>
    this.table = $('#rank-table');
    this.picker = $('#rank-pick');
    this.table.tHead.replaceChildren(el('tr', {}, ...COLUMNS.map(([key, label]) => {
      const th = el('th', { textContent: label, tabIndex: 0, title: 'sort' });
      th.dataset.key = key;
      th.onclick = () => this.sortBy(key);
      th.onkeydown = (ev) => ev.key === 'Enter' && this.sortBy(key);
      return th;
    })));
    this.table.tBodies[0].onclick = (ev) => {
      const tr = ev.target.closest('tr[data-rank]');
      if (!tr) return;
      const rank = Number(tr.dataset.rank);
      this.view.set({ selected: this.view.selected === rank ? null : rank });
    };
    this.picker.onchange = () => this.view.set({ selected: this.picker.value === '' ? null : Number(this.picker.value) });
    this.stop = view.listen((changed) => changed.has('selected') && this.render());
  }

  sortBy(key) {
    this.sort = { key, dir: this.sort.key === key ? -this.sort.dir : 1 };
    this.render();
  }

  /** The latest figure `name` ('loss', 'divergence') of `rank` at `step`. */
  note(rank, step, name, v) {
    let f = this.latest.get(rank);
    if (!f) this.latest.set(rank, (f = {}));
    if (!(f[`${name}Step`] > step)) { f[name] = v; f[`${name}Step`] = step; }
  }

  /** `ranks`: the job's (JobOut.ranks); `rankSteps` (rank -> step seen in metrics) may be ahead. */
  update(ranks, rankSteps, worldSize) {
    this.ranks = ranks.map((r) => ({ ...r, seen: Math.max(r.step ?? 0, rankSteps.get(r.rank) ?? 0), ...this.latest.get(r.rank) }));
    if (this.picker.options.length !== worldSize + 1) {
      this.picker.replaceChildren(el('option', { value: '', textContent: 'none' }),
        ...Array.from({ length: worldSize }, (_, r) => el('option', { value: String(r), textContent: `rank ${r}` })));
    }
    this.render();
  }

  render() {
    measured('rank-table', () => this.renderRows());
  }

  // Rows are kept per rank and only their changed cells written, and moved only when the order
  // changed: rebuilding 256 rows twice a second cost ~40 ms frames (bench/dashboard.py).
  renderRows() {
    const { key, dir } = this.sort;
    const [, , value] = COLUMNS.find((c) => c[0] === key);
    const rows = [...this.ranks].sort((a, b) => {
      const va = value(a);
      const vb = value(b);
      if (!known(va) || !known(vb)) return known(va) ? -1 : known(vb) ? 1 : a.rank - b.rank;
      return (va < vb ? -1 : va > vb ? 1 : 0) * dir || a.rank - b.rank;
    });
    const selected = this.view.selected;
    const trs = rows.map((r) => {
      let tr = this.rows.get(r.rank);
      if (!tr) {
        tr = el('tr', {}, ...COLUMNS.map(([, , , , numeric]) => el('td', { className: numeric ? 'num' : '' })));
        tr.dataset.rank = r.rank;
        this.rows.set(r.rank, tr);
      }
      COLUMNS.forEach(([, , , text], i) => {
        const t = String(text(r));
        if (tr.cells[i].textContent !== t) tr.cells[i].textContent = t;
      });
      tr.cells[6].className = r.connected ? 'yes' : 'no';
      if (r.rank === selected) tr.setAttribute('aria-selected', 'true');
      else tr.removeAttribute('aria-selected');
      return tr;
    });
    const body = this.table.tBodies[0];
    if (trs.length !== body.rows.length || trs.some((tr, i) => body.rows[i] !== tr)) body.replaceChildren(...trs);
    for (const th of this.table.tHead.rows[0].cells) {
      if (th.dataset.key === key) th.dataset.sort = dir > 0 ? 'asc' : 'desc';
      else delete th.dataset.sort;
    }
    this.picker.value = selected === null ? '' : String(selected);
  }

  destroy() {
    this.stop();
    this.table.tBodies[0].onclick = null;
    this.picker.onchange = null;
    this.table.tBodies[0].replaceChildren();
    this.rows.clear();
  }
}
