// The chart toolbar of a job page: it sets the page's ChartView (view.js), which every chart follows.

import { $, el } from './dom.js';
import { listJobs } from './rest.js';

/** The chart toolbar (#chart-tools): log scale, smoothing, another job to overlay, the zoom's
 * range and its reset; and each history chart's CSV button (#csv-<chart>). */
export class ChartTools {
  constructor(jobId, view, charts, showError) {
    Object.assign(this, { jobId, view });
    this.log = $('#log-scale');
    this.smoothing = $('#smoothing');
    this.compare = $('#compare-job');
    this.reset = $('#zoom-reset');
    this.log.onchange = () => view.set({ log: this.log.checked });
    this.smoothing.oninput = () => view.set({ smoothing: Number(this.smoothing.value) });
    this.compare.onchange = () => view.set({ overlay: this.compare.value || null });
    this.compare.onfocus = () => this.listJobs();
    this.reset.onclick = () => view.set({ range: null });
    this.csv = [['#csv-loss', charts.loss], ['#csv-divergence', charts.divergence], ['#csv-drift', charts.drift]].map(([sel, chart]) => {
      const button = $(sel);
      button.onclick = () => chart.download().catch((err) => showError(`CSV: ${err.message}`));
      return button;
    });
    this.stop = view.listen(() => this.render());
    this.listJobs();
    this.render();
  }

  // The other jobs, to pick one to overlay (asked again whenever the list is opened).
  listJobs() {
    listJobs().then((jobs) => {
      const ids = jobs.map((j) => j.id).filter((id) => id !== this.jobId);
      const keep = this.compare.value;
      this.compare.replaceChildren(el('option', { value: '', textContent: 'no other job' }),
        ...ids.map((id) => el('option', { value: id, textContent: id })));
      this.compare.value = ids.includes(keep) ? keep : '';
    }, () => {});
  }

  render() {
    const { range, log, smoothing } = this.view;
    this.log.checked = log;
    this.smoothing.value = String(smoothing);
    $('#smoothing-value').textContent = smoothing.toFixed(2);
    this.reset.hidden = !range;
    $('#zoom-range').textContent = range ? `steps ${range[0]}–${range[1]} (double-click a chart for the whole run)` : 'whole run (drag on a chart to zoom)';
  }

  destroy() {
    this.stop();
    for (const node of [this.log, this.smoothing, this.compare, this.reset, ...this.csv]) node.onchange = node.oninput = node.onclick = node.onfocus = null;
    this.log.checked = false;
    this.smoothing.value = '0';
    this.compare.replaceChildren(el('option', { value: '', textContent: 'no other job' }));
  }
}
