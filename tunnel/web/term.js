// The web terminal (PROTOCOL.md 14.8): xterm.js on the relay's pty websocket (14.7).
// The terminal's id lives in the URL (#id=UUID), so a reload or a second tab reattaches to
// the same reconnecting PTY; the replay the agent sends on attach repaints the screen.
'use strict';

(() => {
  const name = decodeURIComponent(location.pathname.split('/')[2] || '');
  const statusEl = document.getElementById('status');
  const setStatus = (text) => { statusEl.textContent = text; };
  document.getElementById('name').textContent = name;
  document.title = 'tether: ' + name;
  document.getElementById('logout').href = '/w/' + encodeURIComponent(name) + '/logout';

  const uuidRe = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  function newId() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' +
      h.slice(16, 20) + '-' + h.slice(20);
  }
  function idFromUrl() {
    const m = /(?:^#|&)id=([^&]*)/.exec(location.hash);
    return m && uuidRe.test(m[1]) ? m[1].toLowerCase() : null;
  }
  let id = idFromUrl();
  if (!id) {
    id = newId();
    history.replaceState(null, '', location.pathname + location.search + '#id=' + id);
  }

  const term = new Terminal({ cursorBlink: true, scrollback: 5000, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById('term'));
  fit.fit();
  term.focus();
  window.tetherTerm = term; // for tests and the console: the page holds no secret

  let ws = null;
  let exited = false;
  let delay = 500;
  let timer = null;

  const send = (obj) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  };
  term.onData((data) => {
    if (exited) {
      if (data === '\r') { // a new terminal after the old one's process exited
        exited = false;
        id = newId();
        history.replaceState(null, '', location.pathname + location.search + '#id=' + id);
        term.reset();
        connect();
      }
      return;
    }
    send({ data });
  });
  term.onResize(({ rows, cols }) => send({ rows, cols }));
  window.addEventListener('resize', () => fit.fit());
  window.addEventListener('hashchange', () => {
    const h = idFromUrl();
    if (h && h !== id) {
      id = h;
      if (ws) ws.close();
      else connect();
    }
  });

  function connect() {
    clearTimeout(timer);
    timer = null;
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = scheme + '//' + location.host + '/api/v1/workspaces/' + encodeURIComponent(name) +
      '/pty?id=' + id + '&rows=' + term.rows + '&cols=' + term.cols;
    setStatus('connecting');
    const sock = new WebSocket(url);
    ws = sock;
    sock.binaryType = 'arraybuffer';
    let fresh = true;
    let opened = false;
    sock.onopen = () => {
      opened = true;
      setStatus('connected');
      send({ rows: term.rows, cols: term.cols });
    };
    sock.onmessage = (ev) => {
      if (typeof ev.data === 'string') {
        let msg;
        try { msg = JSON.parse(ev.data); } catch (e) { return; }
        if (msg && typeof msg.exit === 'number') {
          exited = true;
          term.write('\r\n[process exited with status ' + msg.exit + '; press Enter for a new terminal]\r\n');
          setStatus('exited');
        }
        return;
      }
      if (fresh) { // the replay of a reattached terminal repaints from a clean screen
        fresh = false;
        term.reset();
        delay = 500;
      }
      term.write(new Uint8Array(ev.data));
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      if (exited) return;
      if (ev.code === 1000 && !opened) return;
      retry(opened);
    };
  }

  async function retry(wasOpen) {
    // A refused upgrade looks like any drop: ask the page itself whether we are logged in.
    try {
      const r = await fetch(location.pathname, { redirect: 'manual', cache: 'no-store' });
      if (r.type === 'opaqueredirect') {
        location.href = '/w/' + encodeURIComponent(name) + '/login' + location.hash;
        return;
      }
    } catch (e) { /* the relay is down: keep trying */ }
    if (wasOpen) delay = 500;
    const wait = delay;
    delay = Math.min(delay * 2, 10000);
    setStatus('disconnected; reconnecting in ' + Math.round(wait / 100) / 10 + ' s');
    timer = setTimeout(connect, wait * (0.8 + Math.random() * 0.4));
  }

  connect();
})();
