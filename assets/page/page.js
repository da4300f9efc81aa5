// The live page of ekid: `/` lists the streams with their statistics, `/?stream=NAME` charts
// one stream. Everything comes from this daemon's own API (the Content-Security-Policy allows
// nothing else). When the API wants a token, the page asks for one and keeps it in
// sessionStorage (this tab only), sending it as `Authorization: Bearer`; the event stream is
// read with fetch() for the same reason (EventSource cannot send that header).
(() => {
  'use strict';

  const TOKEN_KEY = 'ekid.token';
  // Points kept per stream in this tab, and about how many the chart draws (decimated).
  const KEEP = 100000;
  const LEVELS = [0.9, 0.5];
  const LIST_EVERY_MS = 2000;
  const REFRESH_EVERY_MS = 1000;

  // What the page has drawn, for tests and for curious people (`window.__ekid` in a console).
  const dbg = (window.__ekid = {
    view: null, rows: 0, listRefreshes: 0, events: 0, lagged: 0, kept: 0, lastSeq: 0,
    forecastSeq: null, gaps: 0, draws: 0, drawMs: 0, frameMs: 0, drawn: { x: 0, obs: 0, pred: 0, band50: 0, band90: 0, mean: 0, error: 0 },
    errors: [],
  });

  const $ = (sel) => document.querySelector(sel);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v; else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  };
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function fmt(x) {
    if (x === null || x === undefined) return '—';
    if (typeof x !== 'number') return String(x);
    if (x === 0) return '0';
    const a = Math.abs(x);
    return a >= 1e6 || a < 1e-3 ? x.toExponential(3) : x.toPrecision(4).replace(/\.?0+$/, '');
  }
  function ago(iso) {
    if (!iso) return '—';
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
    return `${(s / 86400).toFixed(1)} d ago`;
  }
  // `stats.coverage` holds, per level, the running coverage of each forecast step; the page
  // shows the first step's (the first number of each level, whatever the exact shape).
  function firstNumber(v) {
    if (typeof v === 'number') return v;
    if (Array.isArray(v)) { for (const x of v) { const n = firstNumber(x); if (n !== null) return n; } return null; }
    if (v && typeof v === 'object') { for (const [k, x] of Object.entries(v)) { if (k === 'level') continue; const n = firstNumber(x); if (n !== null) return n; } }
    return null;
  }
  const pct = (x) => (typeof x === 'number' ? `${+(x * 100).toFixed(1)}%` : '—');
  function coverage(c) {
    if (c === null || c === undefined) return '—';
    const parts = [];
    if (Array.isArray(c)) {
      for (const item of c) {
        if (item && typeof item === 'object' && 'level' in item) parts.push(`${pct(item.level)}: ${pct(firstNumber(item))}`);
      }
    } else if (typeof c === 'object') {
      for (const [k, v] of Object.entries(c)) parts.push(`${k}: ${fmt(firstNumber(v))}`);
    }
    return parts.length ? parts.join(', ') : JSON.stringify(c).slice(0, 60);
  }

  function setStatus(text) {
    const s = $('#status');
    s.hidden = !text;
    s.textContent = text || '';
  }
  function setConn(text, live) {
    const c = $('#conn');
    c.textContent = text;
    c.classList.toggle('live', !!live);
  }

  // ---------------------------------------------------------------------------------------------
  // Requests, with the token when one is kept.

  class Unauthorized extends Error {}
  class HttpError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  async function api(path, opts = {}) {
    const headers = Object.assign({}, opts.headers || {});
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    const r = await fetch(path, Object.assign({}, opts, { headers, cache: 'no-store' }));
    if (r.status === 401) throw new Unauthorized('a token is needed');
    return r;
  }

  async function getJson(path) {
    const r = await api(path);
    if (!r.ok) {
      let detail = `${r.status} ${r.statusText}`;
      try { detail = (await r.json()).detail || detail; } catch (_) { /* not a problem document */ }
      throw new HttpError(r.status, detail);
    }
    return r.json();
  }

  let tokenAsked = null;
  function askToken(refused) {
    if (!tokenAsked) {
      tokenAsked = new Promise((resolve) => {
        const form = $('#token-form');
        const input = $('#token-input');
        $('#token-msg').textContent = refused
          ? 'The daemon refused that token. Enter another one:'
          : 'This daemon asks for a token to read its streams. It is kept for this tab only.';
        form.hidden = false;
        input.value = '';
        input.focus();
        form.onsubmit = (ev) => {
          ev.preventDefault();
          const v = input.value.trim();
          if (!v) return;
          sessionStorage.setItem(TOKEN_KEY, v);
          form.hidden = true;
          $('#forget-token').hidden = false;
          tokenAsked = null;
          resolve();
        };
      });
    }
    return tokenAsked;
  }

  // Runs `fn` until it is not refused for want of a token, asking for one each time.
  async function withToken(fn) {
    for (;;) {
      try {
        return await fn();
      } catch (e) {
        if (!(e instanceof Unauthorized)) throw e;
        const had = token() !== null;
        sessionStorage.removeItem(TOKEN_KEY);
        await askToken(had);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // `/`: the streams.

  const COLUMNS = ['name', 'observations', 'last_update', 'mse', 'mse_scaled', 'spread', 'coverage', 'state'];

  function rowCells(s) {
    const st = s.stats;
    return {
      observations: st.observations.toLocaleString('en'),
      last_update: ago(st.last_update),
      mse: fmt(st.mse),
      mse_scaled: fmt(st.mse_scaled),
      spread: fmt(st.spread),
      coverage: coverage(st.coverage),
      state: s.failed ? `failed: ${s.failed}` : 'ok',
    };
  }

  function renderList(streams) {
    const body = $('#streams tbody');
    const rows = new Map([...body.children].map((tr) => [tr.dataset.stream, tr]));
    const seen = new Set();
    let before = null;
    for (const s of [...streams].reverse()) {
      seen.add(s.name);
      let tr = rows.get(s.name);
      if (!tr) {
        tr = el('tr');
        tr.dataset.stream = s.name;
        for (const c of COLUMNS) {
          const td = el('td', { 'data-col': c });
          if (['observations', 'mse', 'mse_scaled', 'spread'].includes(c)) td.className = 'num';
          if (c === 'name') td.append(el('a', { href: `?stream=${encodeURIComponent(s.name)}` }, s.name));
          tr.append(td);
        }
      }
      const cells = rowCells(s);
      for (const td of tr.children) {
        const c = td.dataset.col;
        if (c === 'name') continue;
        if (td.textContent !== cells[c]) td.textContent = cells[c];
        if (c === 'last_update') td.title = s.stats.last_update || '';
        if (c === 'state') td.classList.toggle('failed', !!s.failed);
      }
      // Keep the server's order (by name) with the fewest moves.
      if (tr.nextSibling !== before || tr.parentNode !== body) body.insertBefore(tr, before);
      before = tr;
    }
    for (const [name, tr] of rows) if (!seen.has(name)) tr.remove();
    $('#empty').hidden = streams.length > 0;
    dbg.rows = streams.length;
    dbg.listRefreshes += 1;
  }

  async function listView() {
    dbg.view = 'list';
    $('#list-view').hidden = false;
    document.title = 'ekid: streams';
    for (;;) {
      if (!document.hidden) {
        try {
          const data = await withToken(() => getJson('/v1/streams'));
          renderList(data.streams);
          setStatus(null);
          setConn('live', true);
        } catch (e) {
          setStatus(`Could not read the streams: ${e.message}`);
          setConn('retrying');
        }
      }
      await sleep(LIST_EVERY_MS);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // `/?stream=NAME`: one stream.

  // Reads a Server-Sent Events body, calling `on(type, data)` per event, until it ends.
  async function readEvents(body, on) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    let type = 'message';
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf[nl] === '\r' && buf[nl + 1] === '\n' ? 2 : 1));
        if (line === '') {
          if (data.length) on(type, data.join('\n'));
          type = 'message';
          data = [];
        } else if (!line.startsWith(':')) {
          const i = line.indexOf(':');
          const field = i < 0 ? line : line.slice(0, i);
          const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
          if (field === 'event') type = val;
          else if (field === 'data') data.push(val);
        }
      }
    }
  }

  class Series {
    constructor(outputs) {
      this.outputs = outputs;
      this.seq = [];
      this.y = Array.from({ length: outputs }, () => []);
      this.p = Array.from({ length: outputs }, () => []);
      this.err = [];
      // Observations missing between two kept ones (events skipped and gone from the history).
      this.gaps = 0;
    }
    get last() { return this.seq.length ? this.seq[this.seq.length - 1] : 0; }
    // Appends the observations newer than the last one kept (history and events overlap).
    add(list) {
      let added = 0;
      for (const o of list) {
        if (o.seq <= this.last) continue;
        if (this.seq.length && o.seq !== this.last + 1) this.gaps++;
        this.seq.push(o.seq);
        for (let k = 0; k < this.outputs; k++) {
          this.y[k].push(o.y[k]);
          this.p[k].push(o.prediction ? o.prediction[k] : null);
        }
        this.err.push(o.error === undefined ? null : o.error);
        added++;
      }
      if (this.seq.length > KEEP * 1.1) {
        const cut = this.seq.length - KEEP;
        this.seq.splice(0, cut);
        this.err.splice(0, cut);
        for (let k = 0; k < this.outputs; k++) { this.y[k].splice(0, cut); this.p[k].splice(0, cut); }
      }
      return added;
    }
  }

  // Min and max of `a[i0..i1)` (nulls skipped), in the order they occur.
  function minMax(a, i0, i1) {
    let lo = null, hi = null, ilo = -1, ihi = -1;
    for (let i = i0; i < i1; i++) {
      const v = a[i];
      if (v === null) continue;
      if (lo === null || v < lo) { lo = v; ilo = i; }
      if (hi === null || v > hi) { hi = v; ihi = i; }
    }
    return ilo <= ihi ? [lo, hi] : [hi, lo];
  }

  function maxOf(a, i0, i1) {
    let hi = null;
    for (let i = i0; i < i1; i++) if (a[i] !== null && (hi === null || a[i] > hi)) hi = a[i];
    return hi;
  }

  // The window's points, at most two per pixel column: each bucket of observations becomes
  // two points (its first and last seq) carrying its extremes in the order they came, so peaks
  // survive whatever the zoom.
  function decimate(s, out, window, columns) {
    const n = s.seq.length;
    const i0 = Math.max(0, n - window);
    const x = [], y = [], p = [], e = [];
    const ys = s.y[out], ps = s.p[out];
    const per = Math.max(1, Math.ceil((n - i0) / columns));
    if (per === 1) {
      for (let i = i0; i < n; i++) { x.push(s.seq[i]); y.push(ys[i]); p.push(ps[i]); e.push(s.err[i]); }
      return { x, y, p, e };
    }
    for (let b = i0; b < n; b += per) {
      const b1 = Math.min(n, b + per);
      const [y0, y1] = minMax(ys, b, b1);
      const [p0, p1] = minMax(ps, b, b1);
      const e1 = maxOf(s.err, b, b1);
      x.push(s.seq[b]); y.push(y0); p.push(p0); e.push(e1);
      if (b1 - 1 > b) { x.push(s.seq[b1 - 1]); y.push(y1); p.push(p1); e.push(e1); }
    }
    return { x, y, p, e };
  }

  function streamView(name) {
    dbg.view = 'stream';
    const enc = encodeURIComponent(name);
    const params = new URLSearchParams(location.search);
    const st = {
      info: null,
      series: null,
      out: 0,
      window: Number(params.get('window')) || 1000,
      horizon: Number(params.get('horizon')) || 24,
      forecast: null,
      forecastNote: '',
      charts: null,
      drawQueued: false,
      lastDraw: 0,
      drawGap: 100,
    };
    $('#stream-view').hidden = false;
    $('#stream-name').textContent = name;
    $('#crumb').textContent = `/ ${name}`;
    document.title = `ekid: ${name}`;
    const winSel = $('#window');
    if (![...winSel.options].some((o) => Number(o.value) === st.window)) winSel.append(el('option', { value: String(st.window) }, String(st.window)));
    winSel.value = String(st.window);
    $('#horizon').value = String(st.horizon);

    const keepInUrl = () => {
      const q = new URLSearchParams({ stream: name, window: String(st.window), horizon: String(st.horizon) });
      history.replaceState(null, '', `?${q}`);
    };
    winSel.onchange = () => { st.window = Number(winSel.value); keepInUrl(); queueDraw(); };
    $('#horizon').onchange = () => {
      const h = Math.round(Number($('#horizon').value));
      if (h >= 1) { st.horizon = h; keepInUrl(); refreshSoon(true); }
    };
    $('#output').onchange = () => { st.out = Number($('#output').value); queueDraw(); };

    function renderInfo(info) {
      st.info = info;
      const s = info.stats;
      const items = [
        ['observations', s.observations.toLocaleString('en')],
        ['last seq', String(s.last_seq)],
        ['last update', ago(s.last_update)],
        ['prequential MSE', fmt(s.mse)],
        ['MSE (model units)', fmt(s.mse_scaled)],
        ['spread', fmt(s.spread)],
        ['noise', fmt(s.noise)],
        ['coverage, 1 step', coverage(s.coverage)],
      ];
      if (info.failed) items.push(['failed', info.failed]);
      const dl = $('#stats');
      dl.replaceChildren(...items.map(([k, v]) => el('div', {}, el('dt', {}, k), el('dd', k === 'failed' ? { class: 'failed' } : {}, v))));
      const rows = Object.entries(info.options).map(([k, v]) => el('tr', {}, el('td', {}, k), el('td', {}, typeof v === 'object' ? JSON.stringify(v) : String(v))));
      $('#options tbody').replaceChildren(...rows);
      const outputs = info.options.outputs;
      if (outputs > 1 && $('#output').options.length !== outputs) {
        $('#output').replaceChildren(...Array.from({ length: outputs }, (_, k) => el('option', { value: String(k) }, `y${k + 1}`)));
        $('#output-label').hidden = false;
      }
    }

    // Stats and both forecast levels, at most once a second and one at a time.
    let refreshing = false, refreshTimer = null, lastRefresh = 0, refreshedSeq = -1;
    function refreshSoon(force) {
      if (force) refreshedSeq = -1;
      if (refreshTimer || refreshing) return;
      const wait = Math.max(0, REFRESH_EVERY_MS - (Date.now() - lastRefresh));
      refreshTimer = setTimeout(refresh, wait);
    }
    async function refresh() {
      refreshTimer = null;
      refreshing = true;
      lastRefresh = Date.now();
      const seq = st.series ? st.series.last : 0;
      try {
        renderInfo(await withToken(() => getJson(`/v1/streams/${enc}`)));
        await refreshForecast();
        refreshedSeq = seq;
      } catch (e) {
        dbg.errors.push(String(e.message));
        if (e instanceof HttpError && e.status === 404) setStatus(`No stream named ${name}.`);
      } finally {
        refreshing = false;
      }
      if (st.series && st.series.last !== refreshedSeq) refreshSoon();
    }
    async function refreshForecast() {
      if (st.info.options.inputs > 0) {
        st.forecast = null;
        st.forecastNote = 'its forecasts need the future inputs (POST …/forecast)';
        return;
      }
      try {
        // One roll-out for both bands (nested: the 50% band lies inside the 90% one).
        const f = await withToken(() => getJson(`/v1/streams/${enc}/forecast?horizon=${st.horizon}&level=${LEVELS.join(',')}`));
        st.forecast = f;
        st.forecastNote = `forecast from seq ${f.seq}; bands ${LEVELS.map((l) => `${l * 100}%`).join(' and ')}`;
        dbg.forecastSeq = f.seq;
      } catch (e) {
        if (!(e instanceof HttpError)) throw e;
        st.forecast = null;
        st.forecastNote = e.status === 409 ? 'no forecast yet: the lag buffer is filling' : `no forecast: ${e.message}`;
      }
      $('#forecast-note').textContent = st.forecastNote;
      queueDraw();
    }

    function makeCharts() {
      const chartEl = $('#chart'), errEl = $('#error-chart');
      const width = Math.max(300, chartEl.clientWidth);
      const sync = uPlot.sync('ekid');
      const cursor = { sync: { key: sync.key } };
      const main = new uPlot({
        width, height: 380, cursor,
        scales: { x: { time: false } },
        axes: [{ label: 'seq' }, {}],
        series: [
          { label: 'seq' },
          { label: 'observed', stroke: '#1f6fb2', width: 1.5 },
          { label: 'predicted before', stroke: '#e07b10', width: 1.2, dash: [5, 3] },
          { label: 'forecast', stroke: '#2c7a3f', width: 2 },
          { label: `${LEVELS[0] * 100}% upper`, stroke: 'rgba(44,122,63,0.35)', width: 1 },
          { label: `${LEVELS[0] * 100}% lower`, stroke: 'rgba(44,122,63,0.35)', width: 1 },
          { label: `${LEVELS[1] * 100}% upper`, stroke: 'rgba(44,122,63,0.5)', width: 1 },
          { label: `${LEVELS[1] * 100}% lower`, stroke: 'rgba(44,122,63,0.5)', width: 1 },
        ],
        bands: [
          { series: [4, 5], fill: 'rgba(44,122,63,0.12)' },
          { series: [6, 7], fill: 'rgba(44,122,63,0.22)' },
        ],
        // The time from building the data to the end of uPlot's drawing (which it defers to a
        // microtask).
        hooks: { draw: [() => { dbg.draws += 1; dbg.drawMs = performance.now() - st.drawStart; }] },
      }, [[], [], [], [], [], [], [], []], chartEl);
      const err = new uPlot({
        width, height: 200, cursor,
        scales: { x: { time: false } },
        axes: [{ label: 'seq' }, {}],
        series: [{ label: 'seq' }, { label: 'squared error (max per column)', stroke: '#b3261e', width: 1, fill: 'rgba(179,38,30,0.08)' }],
      }, [[], []], errEl);
      new ResizeObserver(() => {
        const w = Math.max(300, chartEl.clientWidth);
        main.setSize({ width: w, height: 380 });
        err.setSize({ width: w, height: 200 });
      }).observe(chartEl);
      return { main, err };
    }

    // Draws at most once per `drawGap`: three times what the last frame took to draw and show
    // (at least 100 ms), so that a stream of events leaves the page free to answer whatever
    // the machine renders with (software rasterisation of a large canvas takes a while).
    function queueDraw() {
      if (st.drawQueued) return;
      st.drawQueued = true;
      const wait = Math.max(0, st.lastDraw + st.drawGap - performance.now());
      setTimeout(() => requestAnimationFrame(draw), wait);
    }
    function draw() {
      st.drawQueued = false;
      if (!st.series) return;
      if (!st.charts) st.charts = makeCharts();
      st.drawStart = st.lastDraw = performance.now();
      // The next frame comes once this one is drawn and shown.
      requestAnimationFrame(() => {
        dbg.frameMs = performance.now() - st.drawStart;
        st.drawGap = Math.min(2000, Math.max(100, 3 * dbg.frameMs));
      });
      const s = st.series;
      const columns = Math.max(100, Math.floor($('#chart').clientWidth));
      const d = decimate(s, st.out, st.window, columns);
      const n = d.x.length;
      const none = () => new Array(n).fill(null);
      const mean = none(), hi90 = none(), lo90 = none(), hi50 = none(), lo50 = none();
      if (st.forecast && n > 0) {
        // The forecast starts from the last observation it saw; the steps past what is drawn
        // are added (the next refresh replaces a forecast that fell behind).
        const lastX = d.x[n - 1];
        const f = st.forecast;
        if (f.seq === lastX) {
          const yl = s.y[st.out][s.seq.length - 1];
          mean[n - 1] = hi90[n - 1] = lo90[n - 1] = hi50[n - 1] = lo50[n - 1] = yl;
        }
        for (const step of f.steps) {
          const x = f.seq + step.step;
          if (x <= lastX) continue;
          const [b90, b50] = step.intervals;
          d.x.push(x); d.y.push(null); d.p.push(null); d.e.push(null);
          mean.push(step.mean[st.out]);
          hi90.push(b90.upper[st.out]); lo90.push(b90.lower[st.out]);
          hi50.push(b50.upper[st.out]); lo50.push(b50.lower[st.out]);
        }
      }
      const count = (a) => a.reduce((c, v) => c + (v === null ? 0 : 1), 0);
      st.charts.main.setData([d.x, d.y, d.p, mean, hi90, lo90, hi50, lo50]);
      st.charts.err.setData([d.x, d.e]);
      dbg.drawn = { x: d.x.length, obs: count(d.y), pred: count(d.p), mean: count(mean), band90: count(hi90), band50: count(hi50), error: count(d.e) };
      dbg.kept = s.seq.length;
      dbg.gaps = s.gaps;
      dbg.lastSeq = s.last;
      const c = $('#chart');
      c.dataset.obs = String(dbg.drawn.obs);
      c.dataset.pred = String(dbg.drawn.pred);
      c.dataset.band = String(dbg.drawn.band90);
      c.dataset.lastSeq = String(s.last);
    }

    // Events first (so nothing falls between), then the kept history, then the events that
    // came meanwhile; again after every reconnection.
    async function follow() {
      let backoff = 500;
      for (;;) {
        try {
          const r = await withToken(() => api(`/v1/streams/${enc}/events`, { headers: { Accept: 'text/event-stream' } }));
          if (r.status === 404) { setStatus(`No stream named ${name} (deleted?).`); setConn('ended'); return; }
          if (!r.ok) throw new HttpError(r.status, `events: ${r.status}`);
          setConn('live', true);
          // Events that arrive while the history loads wait here, then follow it.
          let pending = [];
          const catchUp = async () => {
            await loadHistory();
            st.series.add(pending);
            pending = null;
            queueDraw();
            refreshSoon(true);
          };
          const ended = readEvents(r.body, (type, data) => {
            if (type === 'observation') {
              dbg.events += 1;
              const o = JSON.parse(data);
              if (pending) { pending.push(o); return; }
              if (st.series.add([o])) { queueDraw(); refreshSoon(); }
            } else if (type === 'lagged' && !pending) {
              // Events were skipped: what the history still holds fills the gap.
              dbg.lagged += 1;
              pending = [];
              catchUp().catch((e) => dbg.errors.push(String(e.message)));
            }
          }).catch((e) => dbg.errors.push(String(e.message)));
          await catchUp();
          await ended;
          backoff = 500;
        } catch (e) {
          dbg.errors.push(String(e.message));
        }
        setConn('reconnecting…');
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 10000);
      }
    }
    async function loadHistory() {
      const h = await withToken(() => getJson(`/v1/streams/${enc}/history`));
      if (!st.series) st.series = new Series(st.info ? st.info.options.outputs : h.observations[0]?.y.length || 1);
      // After a gap (a lagged subscriber), newer events are already kept: add only what is new.
      st.series.add(h.observations);
      queueDraw();
    }

    (async () => {
      try {
        renderInfo(await withToken(() => getJson(`/v1/streams/${enc}`)));
      } catch (e) {
        setStatus(e instanceof HttpError && e.status === 404 ? `No stream named ${name}.` : `Could not read the stream: ${e.message}`);
        return;
      }
      st.series = new Series(st.info.options.outputs);
      follow();
      setInterval(() => { if (!document.hidden) refreshSoon(); }, 10000);
    })();
  }

  // ---------------------------------------------------------------------------------------------

  $('#forget-token').hidden = token() === null;
  $('#forget-token').onclick = () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); };
  window.addEventListener('unhandledrejection', (ev) => dbg.errors.push(String(ev.reason)));
  const stream = new URLSearchParams(location.search).get('stream');
  if (stream) streamView(stream); else listView();
})();
