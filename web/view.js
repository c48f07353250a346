// What every chart of a job page shows, set once for all of them: the range of steps (null: the
// whole run), log scale, smoothing, the selected rank and another job to overlay. Charts listen.

export class ChartView {
  constructor() {
    this.range = null; // [from_step, to_step] when zoomed
    this.log = false;
    this.smoothing = 0; // the EMA weight, 0..0.99
    this.selected = null; // a rank, highlighted in every chart and the rank table
    this.overlay = null; // another job's id, its series drawn dashed
    this.listeners = new Set();
  }

  /** listener(changed: Set of the names that changed); returns a function that stops it. */
  listen(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Change some of range, log, smoothing, selected, overlay; listeners hear what did change. */
  set(changes) {
    const changed = new Set();
    for (const [key, value] of Object.entries(changes)) {
      if (JSON.stringify(this[key]) === JSON.stringify(value)) continue;
      this[key] = value;
      changed.add(key);
    }
    if (changed.size) for (const listener of [...this.listeners]) listener(changed);
  }
}
