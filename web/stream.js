// One websocket per job page: /ws/jobs/{job_id}. The server sends a snapshot on every (re)connect,
// then live messages; on a drop we reconnect with capped exponential backoff and jitter.

import { parseJson } from './figures.js';

const MIN_DELAY_MS = 250;
const MAX_DELAY_MS = 5000;

export class JobStream {
  /**
   * onMessage(msg) gets every parsed message; onState(state, detail) gets
   * "connecting" | "connected" | "reconnecting" | "closed"; onDrop() runs after each drop
   * (the page uses it to ask REST why: wrong token, unknown job).
   */
  constructor(jobId, { onMessage, onState, onDrop }) {
    this.url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws/jobs/${encodeURIComponent(jobId)}`;
    Object.assign(this, { onMessage, onState, onDrop });
    this.attempt = 0;
    this.ws = null;
    this.timer = null;
    this.stopped = false;
  }

  start() {
    this.onState('connecting', '');
    this.connect();
  }

  connect() {
    const ws = (this.ws = new WebSocket(this.url));
    ws.onopen = () => {
      this.attempt = 0;
      this.onState('connected', '');
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = parseJson(ev.data); } catch { return; }
      if (msg && typeof msg === 'object') this.onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (this.stopped || ws !== this.ws) return;
      this.ws = null;
      // The server closes with a policy code when the token is wrong: retrying will not help.
      // (An unknown job, 4404, is retried: its workers may not have said hello yet.)
      if (ev.code === 1008 || ev.code === 4401 || ev.code === 4403) {
        this.onState('closed', ev.reason || 'closed by the server');
        this.onDrop?.(ev);
        return;
      }
      const delay = Math.min(MAX_DELAY_MS, MIN_DELAY_MS * 2 ** this.attempt) * (0.75 + Math.random() / 2);
      this.attempt += 1;
      this.onState('reconnecting', `attempt ${this.attempt}, next in ${(delay / 1000).toFixed(1)} s`);
      this.timer = setTimeout(() => this.connect(), delay);
      this.onDrop?.(ev);
    };
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, 'page closed');
    this.ws = null;
  }
}
