// The web terminal in a real browser: chromium (headless, driven by playwright-core) logs in
// to a real relay, types into the real agent's shell through xterm.js, reloads (the replay
// repaints the output), and resizes the window (the PTY follows).
//
//   node terminal.mjs TETHER_BIN SCRATCH_DIR [CHROMIUM]     (exit 0 = pass)
//
// Run by tests/integration/test_web.py::test_browser.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const [binArg, dir, exe = '/usr/bin/chromium'] = process.argv.slice(2);
const bin = resolve(binArg);
const procs = [];
const log = (...a) => console.log('[browser]', ...a);

function start(name, args) {
  const p = spawn(bin, args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  p.out = '';
  p.stdout.on('data', (d) => { p.out += d; });
  p.stderr.on('data', (d) => { p.out += d; });
  p.name = name;
  procs.push(p);
  return p;
}

async function until(what, fn, ms = 20000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('timed out waiting for ' + what + ' (last: ' + last + ')');
}

async function main() {
  mkdirSync(dir, { recursive: true });
  const agentTok = 'agent-' + randomBytes(16).toString('hex');
  const userTok = 'user-' + randomBytes(16).toString('hex');
  writeFileSync(join(dir, 'tokens.json'),
    JSON.stringify({ agents: { [agentTok]: 'alpha' }, users: { [userTok]: ['alpha'] } }),
    { mode: 0o600 });
  writeFileSync(join(dir, 'agent.token'), agentTok + '\n', { mode: 0o600 });
  const relay = start('relay', ['relay', '--listen', '127.0.0.1:0', '--tokens',
    join(dir, 'tokens.json')]);
  const port = await until('the relay', () => {
    const m = /relay listening on ws:\/\/127\.0\.0\.1:(\d+)/.exec(relay.out);
    return m && Number(m[1]);
  });
  const base = 'http://127.0.0.1:' + port;
  start('agent', ['agent', '--url', 'ws://127.0.0.1:' + port, '--token-file',
    join(dir, 'agent.token'), '--state-dir', join(dir, 'state')]);
  await until('the agent', async () => {
    const r = await fetch(base + '/api/v1/workspaces/alpha',
      { headers: { Authorization: 'Bearer ' + userTok } });
    return r.ok && (await r.json()).connected;
  });

  const browser = await chromium.launch({ executablePath: exe, headless: true,
    args: ['--no-sandbox', '--disable-gpu'] });
  try {
    const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
    const problems = [];
    page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
    page.on('pageerror', (e) => problems.push(String(e)));
    page.on('response', (r) => { if (r.status() >= 400) problems.push(r.status() + ' ' + r.url()); });

    await page.goto(base + '/w/alpha');
    if (!page.url().endsWith('/w/alpha/login')) throw new Error('no login form: ' + page.url());
    await page.fill('#token', userTok);
    await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
    const lines = () => page.evaluate(() => {
      const b = window.tetherTerm.buffer.active;
      const out = [];
      for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
      return out;
    });
    const connected = () => until('the terminal to connect', () => page.evaluate(() =>
      window.tetherTerm !== undefined &&
      document.getElementById('status').textContent === 'connected'));
    await connected();
    const url1 = page.url();
    if (!/\/w\/alpha#id=[0-9a-f-]{36}$/.test(url1)) throw new Error('no id in the URL: ' + url1);
    const cookies = await page.context().cookies();
    const c = cookies.find((x) => x.name === 'tether_token');
    if (!c || !c.httpOnly || c.sameSite !== 'Strict') throw new Error('cookie: ' + JSON.stringify(c));
    const leaked = await page.evaluate((t) => document.documentElement.outerHTML.includes(t) ||
      document.cookie.includes(t), userTok);
    if (leaked) throw new Error('the token is visible to the page');
    log('logged in, terminal at', url1);

    // the shell's prompt first, then type
    await until('a prompt', async () => (await lines()).some((l) => l.trim() !== ''));
    await page.keyboard.type('echo hi');
    await page.keyboard.press('Enter');
    await until('"hi" in the terminal', async () => (await lines()).some((l) => l.trim() === 'hi'));
    log('typed echo hi, saw hi');

    await page.reload();
    if (page.url() !== url1) throw new Error('the reload changed the URL: ' + page.url());
    await connected();
    await until('the replay to show "hi"', async () =>
      (await lines()).some((l) => l.trim() === 'hi'));
    log('reloaded: the replay shows hi');

    const sizeLine = async (rows, cols) => {
      await page.keyboard.type('stty size');
      await page.keyboard.press('Enter');
      const want = rows + ' ' + cols;
      await until('stty size = ' + want, async () => (await lines()).some((l) => l.trim() === want));
      return want;
    };
    const before = await page.evaluate(() => [window.tetherTerm.rows, window.tetherTerm.cols]);
    await sizeLine(...before);
    await page.setViewportSize({ width: 640, height: 420 });
    const after = await until('the terminal to refit', async () => {
      const s = await page.evaluate(() => [window.tetherTerm.rows, window.tetherTerm.cols]);
      return s[0] !== before[0] && s[1] !== before[1] && s;
    });
    await sizeLine(...after);
    log('resized', before.join('x'), '->', after.join('x'), 'and stty size followed');

    // the relay restarts: the page reconnects by itself and the replay repaints
    relay.kill('SIGKILL');
    await until('the page to notice the drop', () => page.evaluate(() =>
      document.getElementById('status').textContent !== 'connected'));
    const relay2 = start('relay2', ['relay', '--listen', '127.0.0.1:' + port, '--tokens',
      join(dir, 'tokens.json')]);
    await until('the relay to listen again', () => /relay listening/.test(relay2.out));
    await until('the terminal to reconnect', () => page.evaluate(() =>
      document.getElementById('status').textContent === 'connected'), 40000);
    await until('the replay to show "hi" again', async () =>
      (await lines()).some((l) => l.trim() === 'hi'));
    await page.keyboard.type('echo again-$((40+2))');
    await page.keyboard.press('Enter');
    await until('"again-42"', async () => (await lines()).some((l) => l.trim() === 'again-42'));
    log('relay restarted: the page reconnected, replayed and works');
    // the failed reconnects of the restart are expected network errors, nothing else
    const real = problems.filter((p) => !/WebSocket connection|ERR_CONNECTION_REFUSED|Failed to load resource: net::/.test(p));
    if (real.length) throw new Error('console errors: ' + real.join(' | '));
  } finally {
    await browser.close();
  }
}

main().then(() => {
  log('ok');
  process.exitCode = 0;
}, (e) => {
  console.error('[browser] FAIL:', e && e.stack || e);
  for (const p of procs) console.error('--- ' + p.name + ':\n' + p.out.slice(-2000));
  process.exitCode = 1;
}).finally(() => {
  for (const p of procs) p.kill('SIGTERM');
});
