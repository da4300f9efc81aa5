// The live page in a real browser: headless Chromium (/usr/bin/chromium, or $CHROMIUM) driven
// by playwright-core against the release binary (target/release/ekid, or $EKID_BIN), which this
// script does not build.
//
//   node tests/browser/page.test.mjs [--screenshot PATH]
//
// 1. Open reads: replays a bundled CSV, opens `/` (the stream is listed with its count), opens
//    `/?stream=NAME` (the chart drew observations, predictions, the forecast and both bands),
//    posts more observations and waits for the chart and its forecast to follow them, checks
//    the content types and caching headers of the page and its files, that the vendored uPlot
//    is served byte for byte as SHA256SUMS says, that a two-output stream gets an output
//    selector, and saves a screenshot.
// 2. `protect_reads`: the page asks for a token, says when one is refused, and with the right
//    one lists and charts the stream live.
// 3. Load: 50 streams listed, and a stream of 100,000 points drawn decimated while observations
//    keep coming; prints how long things took (figures for BENCHMARKS.md, not assertions).
//
// Every run fails if the page requests anything from another host or breaks its
// Content-Security-Policy, or if a script error reaches the page.

import { spawn, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const bin = process.env.EKID_BIN || join(root, 'target/release/ekid');
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const shotArg = process.argv.indexOf('--screenshot');
const work = mkdtempSync(join(tmpdir(), 'ekid-browser-'));
const screenshot = shotArg > 0 ? resolve(process.argv[shotArg + 1]) : join(tmpdir(), 'ekid-page.png');
// Generous bounds for things that should take a second: a hang fails instead of blocking CI.
const WAIT = { timeout: 30000 };

const daemons = [];
let browser;

function check(cond, what) {
  if (!cond) throw new Error(`FAILED: ${what}`);
  console.log(`ok: ${what}`);
}

async function startDaemon(name, config) {
  const dir = join(work, name);
  execFileSync('mkdir', ['-p', dir]);
  const cfg = join(dir, 'ekid.toml');
  writeFileSync(cfg, config);
  const child = spawn(bin, ['serve', '--config', cfg, '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'data')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  daemons.push(child);
  let log = '';
  child.stderr.on('data', (d) => { log += d; });
  const base = await new Promise((ok, fail) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/\S+)/);
      if (m) ok(m[1]);
    });
    child.on('exit', (code) => fail(new Error(`the daemon exited (${code}): ${log}`)));
  });
  return { base, child, log: () => log };
}

async function request(base, path, { method = 'GET', body, type, token } = {}) {
  const headers = {};
  if (type) headers['content-type'] = type;
  if (token) headers.authorization = `Bearer ${token}`;
  const r = await fetch(base + path, { method, body, headers });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
  return { r, text };
}

function observations(values, firstSeq) {
  return values.map((y, i) => JSON.stringify({ seq: firstSeq + i, y })).join('\n');
}

async function newPage(base) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const origin = new URL(base).host;
  const seen = { hosts: new Set(), responses: new Map(), problems: [] };
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (u.protocol !== 'data:') seen.hosts.add(u.host);
  });
  page.on('response', (r) => seen.responses.set(new URL(r.url()).pathname, r));
  page.on('pageerror', (e) => seen.problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/401|Unauthorized/.test(m.text())) seen.problems.push(`console: ${m.text()}`);
  });
  await page.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      (window.__csp = window.__csp || []).push(`${e.violatedDirective} ${e.blockedURI}`);
    });
  });
  const finish = async () => {
    const csp = await page.evaluate(() => window.__csp || []);
    check(csp.length === 0, `no Content-Security-Policy violation (${csp.join('; ') || 'none'})`);
    const others = [...seen.hosts].filter((h) => h !== origin);
    check(others.length === 0, `every request went to the daemon ${origin} (others: ${others.join(', ') || 'none'})`);
    check(seen.problems.length === 0, `no script error (${seen.problems.join('; ') || 'none'})`);
    await context.close();
  };
  return { page, seen, finish };
}

const ekid = (page) => page.evaluate(() => JSON.parse(JSON.stringify(window.__ekid)));

async function openReads() {
  console.log('--- open reads');
  const d = await startDaemon('open', '[storage]\nfsync = "never"\n');
  execFileSync(bin, ['replay', join(root, 'datasets/daily-min-temperatures.csv'), '--stream', 'temp', '--server', d.base], { stdio: 'ignore' });
  await request(d.base, '/v1/streams/pair', { method: 'PUT', type: 'application/json', body: '{"outputs": 2, "lags": 2, "ensemble": 10, "hidden": 4}' });
  await request(d.base, '/v1/streams/pair/observations', {
    method: 'POST', type: 'application/x-ndjson',
    body: Array.from({ length: 30 }, (_, i) => JSON.stringify({ y: [Math.sin(i / 3), Math.cos(i / 3)] })).join('\n'),
  });

  const { page, seen, finish } = await newPage(d.base);
  await page.goto(`${d.base}/`);
  const row = page.locator('#streams tr[data-stream="temp"]');
  await row.waitFor(WAIT);
  await page.waitForFunction(() => document.querySelector('#streams tr[data-stream="temp"] td[data-col="observations"]')?.textContent === '3,650', null, WAIT);
  check(true, '`/` lists the stream `temp` with its 3,650 observations');
  check(await page.locator('#streams tr[data-stream="pair"]').count() === 1, '`/` lists the stream `pair`');
  await request(d.base, '/v1/streams/pair/observations', {
    method: 'POST', type: 'application/x-ndjson', body: Array.from({ length: 5 }, () => '{"y": [0.5, 0.5]}').join('\n'),
  });
  await page.waitForFunction(() => document.querySelector('#streams tr[data-stream="pair"] td[data-col="observations"]')?.textContent === '35', null, WAIT);
  check(true, "the list follows the streams' statistics (`pair` went from 30 to 35 observations)");

  // Content types and caching of the page and its files.
  const html = seen.responses.get('/');
  check(html.headers()['content-type'] === 'text/html; charset=utf-8', 'the page is text/html');
  check(html.headers()['cache-control'] === 'no-cache', 'the page is revalidated on every load');
  check((html.headers()['content-security-policy'] || '').startsWith("default-src 'self'"), "the page's CSP allows this daemon only");
  const assets = [...seen.responses.keys()].filter((p) => p.startsWith('/assets/'));
  check(assets.length === 4, `the page loaded its 4 files (${assets.join(', ')})`);
  for (const p of assets) {
    const h = seen.responses.get(p).headers();
    const want = p.endsWith('.js') ? 'text/javascript; charset=utf-8' : 'text/css; charset=utf-8';
    check(h['content-type'] === want && h['x-content-type-options'] === 'nosniff', `${p} is ${want}, nosniff`);
    check(h['cache-control'] === 'public, max-age=31536000, immutable', `${p} is cacheable for a year`);
  }
  const sums = new Map(readFileSync(join(root, 'assets/vendor/uplot/SHA256SUMS'), 'utf8').trim().split('\n').map((l) => l.split(/\s+/).reverse()));
  for (const [file, stem] of [['uPlot.iife.min.js', '/assets/uPlot.iife.min.'], ['uPlot.min.css', '/assets/uPlot.min.']]) {
    const path = assets.find((p) => p.startsWith(stem));
    const bytes = Buffer.from(await (await fetch(d.base + path)).arrayBuffer());
    const sum = createHash('sha256').update(bytes).digest('hex');
    check(sum === sums.get(file), `${path} is the vendored ${file} (sha256 ${sum.slice(0, 16)}…)`);
  }

  // One stream's chart.
  await page.click('#streams tr[data-stream="temp"] a');
  await page.waitForURL(/\?stream=temp/, WAIT);
  await page.goto(`${d.base}/?stream=temp&window=365&horizon=60`);
  await page.waitForFunction(() => {
    const e = window.__ekid;
    return e.forecastSeq === 3650 && e.drawn.mean > 0 && e.draws > 0;
  }, null, WAIT);
  let s = await ekid(page);
  check(s.drawn.obs === 365 && s.drawn.pred === 365, `the chart drew the window's 365 observations and predictions (${s.drawn.obs}, ${s.drawn.pred})`);
  check(s.drawn.band90 === 61 && s.drawn.band50 === 61 && s.drawn.mean === 61, `the chart drew the 60-step forecast and both bands from the last observation (${s.drawn.mean}, ${s.drawn.band90}, ${s.drawn.band50})`);
  check(s.drawn.error === 365, 'the error chart drew the window');
  const inked = await page.evaluate(() => {
    const c = document.querySelector('#chart canvas');
    const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++;
    return n;
  });
  check(inked > 10000, `the chart's canvas is drawn on (${inked} pixels)`);
  check(await page.locator('#options tbody tr').count() > 10, "the stream's options are shown");
  check(await page.locator('#output-label').isHidden(), 'a one-output stream has no output selector');

  // Live: more observations move the chart and its forecast.
  const drawsBefore = s.draws;
  // The same days a year before, as if the series went on.
  const temps = readFileSync(join(root, 'datasets/daily-min-temperatures.csv'), 'utf8').trim().split('\n').slice(1)
    .map((l) => Number(l.split(',').pop().replace(/"/g, '')));
  const more = temps.slice(3650 - 365, 3650 - 345);
  await request(d.base, '/v1/streams/temp/observations', { method: 'POST', type: 'application/x-ndjson', body: observations(more, 3651) });
  await page.waitForFunction(() => window.__ekid.lastSeq === 3670 && window.__ekid.forecastSeq === 3670, null, WAIT);
  s = await ekid(page);
  check(s.events === 20 && s.kept === 3670 && s.draws > drawsBefore, `the chart followed 20 posted observations live (${s.events} events, ${s.kept} kept, forecast from ${s.forecastSeq})`);
  check(s.drawn.obs === 365 && s.drawn.mean === 61, 'the window still holds 365 observations and the refreshed forecast');
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot: ${screenshot}`);
  // A batch larger than the events a subscriber may fall behind (1024): the page is told it
  // lagged and fills the gap from the history.
  const burst = Array.from({ length: 5000 }, (_, i) => temps[i % 3650]);
  await request(d.base, '/v1/streams/temp/observations', { method: 'POST', type: 'application/x-ndjson', body: observations(burst, 3671) });
  await page.waitForFunction(() => window.__ekid.lastSeq === 8670 && window.__ekid.forecastSeq === 8670, null, WAIT);
  s = await ekid(page);
  check(s.kept === 8670 && s.gaps === 0, `after a burst of 5,000 the page holds all 8,670 observations without a gap (told it lagged ${s.lagged} times)`);
  await finish();

  // A two-output stream: one output at a time, chosen with a selector.
  const two = await newPage(d.base);
  await two.page.goto(`${d.base}/?stream=pair`);
  await two.page.waitForFunction(() => window.__ekid.drawn.obs === 35 && window.__ekid.forecastSeq === 35, null, WAIT);
  check(await two.page.locator('#output option').count() === 2, 'a two-output stream offers its outputs y1 and y2');
  const first = await two.page.evaluate(() => window.__ekid.draws);
  await two.page.selectOption('#output', '1');
  await two.page.waitForFunction((n) => window.__ekid.draws > n, first, WAIT);
  check(true, 'choosing y2 redraws the chart');
  await two.finish();
}

async function protectedReads() {
  console.log('--- protect_reads');
  const token = 's3cret-token';
  const d = await startDaemon('auth', `[auth]\ntokens = ["${token}"]\nprotect_reads = true\n[storage]\nfsync = "never"\n`);
  await request(d.base, '/v1/streams/guarded', { method: 'PUT', type: 'application/json', body: '{"ensemble": 20, "hidden": 4, "lags": 3}', token });
  await request(d.base, '/v1/streams/guarded/observations', { method: 'POST', type: 'application/x-ndjson', body: observations([1, 2, 3, 4, 5, 6, 5, 4, 3, 2], 1), token });
  const { page, finish } = await newPage(d.base);
  await page.goto(`${d.base}/`);
  await page.locator('#token-form').waitFor({ state: 'visible', ...WAIT });
  check(true, 'with protect_reads the page asks for a token');
  await page.fill('#token-input', 'wrong');
  await page.click('#token-form button');
  await page.waitForFunction(() => /refused/.test(document.querySelector('#token-msg').textContent), null, WAIT);
  check(true, 'a wrong token is refused and asked for again');
  await page.fill('#token-input', token);
  await page.click('#token-form button');
  await page.locator('#streams tr[data-stream="guarded"]').waitFor(WAIT);
  check(await page.locator('#token-form').isHidden(), 'with the token the streams are listed');
  // The token is kept for the tab: the stream's page needs no second prompt.
  await page.goto(`${d.base}/?stream=guarded`);
  await page.waitForFunction(() => window.__ekid.lastSeq === 10 && window.__ekid.forecastSeq === 10, null, WAIT);
  check(await page.locator('#token-form').isHidden(), "the stream's chart loads with the tab's token");
  await request(d.base, '/v1/streams/guarded/observations', { method: 'POST', type: 'application/x-ndjson', body: observations([3, 4], 11), token });
  await page.waitForFunction(() => window.__ekid.lastSeq === 12 && window.__ekid.events === 2, null, WAIT);
  check(true, 'the event stream, read with the token, brings new observations live');
  await finish();
}

async function load() {
  console.log('--- 50 streams, 100,000 points');
  const d = await startDaemon('load', '[limits]\nhistory = 100000\n[storage]\nfsync = "never"\n');
  const tiny = '{"ensemble": 4, "hidden": 2, "lags": 2}';
  for (let i = 0; i < 50; i++) {
    const name = `s${String(i).padStart(2, '0')}`;
    await request(d.base, `/v1/streams/${name}`, { method: 'PUT', type: 'application/json', body: tiny });
    await request(d.base, `/v1/streams/${name}/observations`, { method: 'POST', type: 'application/x-ndjson', body: observations([1, 2, 3, 2, 1, 2].map((v) => v + i), 1) });
  }
  await request(d.base, '/v1/streams/big', { method: 'PUT', type: 'application/json', body: tiny });
  const n = 100000;
  const wave = Array.from({ length: n }, (_, i) => Math.sin(i / 50) + 0.3 * Math.sin(i / 7) + (i % 997 === 0 ? 3 : 0));
  await request(d.base, '/v1/streams/big/observations', { method: 'POST', type: 'application/x-ndjson', body: observations(wave, 1) });

  const { page, finish } = await newPage(d.base);
  let t = Date.now();
  await page.goto(`${d.base}/`);
  await page.waitForFunction(() => window.__ekid.rows === 51, null, WAIT);
  const listMs = Date.now() - t;
  check(await page.locator('#streams tbody tr').count() === 51, '`/` lists all 51 streams');

  t = Date.now();
  await page.goto(`${d.base}/?stream=big&window=100000&horizon=100`);
  await page.waitForFunction((n) => window.__ekid.kept === n && window.__ekid.forecastSeq === n, n, WAIT);
  const chartMs = Date.now() - t;
  let s = await ekid(page);
  const columns = await page.evaluate(() => document.querySelector('#chart').clientWidth);
  check(s.kept === n, `the page holds the stream's ${n} points`);
  check(s.drawn.obs <= 2 * columns + 2 && s.drawn.obs > columns, `it draws them decimated to ${s.drawn.obs} points for ${columns} pixel columns`);
  // How long the page takes to answer, idle and while observations keep coming, and the
  // longest tasks its main thread ran meanwhile (Long Tasks API: those over 50 ms).
  const rounds = 20;
  const answer = async () => { const a = performance.now(); await page.evaluate(() => window.__ekid.draws); return performance.now() - a; };
  const idle = [];
  for (let r = 0; r < rounds; r++) idle.push(await answer());
  await page.evaluate(() => {
    window.__long = [];
    new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__long.push(e.duration); }).observe({ type: 'longtask' });
  });
  const busy = [];
  for (let r = 0; r < rounds; r++) {
    const first = n + 1 + r * 100;
    await request(d.base, '/v1/streams/big/observations', { method: 'POST', type: 'application/x-ndjson', body: observations(wave.slice(0, 100), first) });
    busy.push(await answer());
  }
  await page.waitForFunction((last) => window.__ekid.lastSeq === last, n + rounds * 100, WAIT);
  s = await ekid(page);
  check(s.kept === n + rounds * 100, `it followed ${rounds * 100} more observations live (keeps ${s.kept}, at most 110,000 before it drops the oldest)`);
  const long = await page.evaluate(() => window.__long);
  const median = (a) => [...a].sort((x, y) => x - y)[a.length >> 1].toFixed(1);
  console.log(`figures: list of 51 streams shown in ${listMs} ms; 100k-point chart with forecast in ${chartMs} ms; ` +
    `one decimated draw ${s.drawMs.toFixed(1)} ms, shown in ${s.frameMs.toFixed(0)} ms; page answers in median ${median(idle)} ms idle, ${median(busy)} ms (max ${Math.max(...busy).toFixed(0)}) ` +
    `while ${rounds}×100 observations arrived; main-thread tasks over 50 ms meanwhile: ${long.length}${long.length ? ` (longest ${Math.max(...long).toFixed(0)} ms)` : ''}`);
  await finish();
}

try {
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  await openReads();
  await protectedReads();
  await load();
  console.log('browser test: all passed');
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  await Promise.all(daemons.map((d) => (d.exitCode !== null || d.signalCode !== null ? null : new Promise((ok) => { d.on('exit', ok); d.kill('SIGTERM'); }))));
  rmSync(work, { recursive: true, force: true });
}
