// ringblock dashboard: live stats over a streamed fetch of /api/events (server-sent events
// format; fetch() so the token travels in the Authorization header, never in a URL), tables
// refreshed from the REST API, charts drawn on <canvas>. No dependencies, no build step.
'use strict';

const TOKEN_KEY = 'ringblock.token';
const HISTORY = 120; // samples (seconds) shown in the charts, at most
const MIN_SPAN = 30; // seconds on the time axis, at least
const REFRESH_MS = 3000; // tables
const COLORS = ['#4fb3ff', '#3fbf7f', '#e6b34a', '#c779f2', '#ef5f5f', '#5fd6d6', '#f29b6b', '#9aa9ff'];

const $ = (id) => document.getElementById(id);
const state = { token: null, samples: [], lastSeq: 0, abort: null, volumes: [], running: false };

// ----- formatting ---------------------------------------------------------------------------
function fmtCount(v) {
  if (v == null || !isFinite(v)) return '–';
  if (v < 1000) return v < 10 && v % 1 ? v.toFixed(1) : Math.round(v).toString();
  if (v < 1e6) return (v / 1e3).toFixed(v < 1e4 ? 2 : 1) + 'k';
  return (v / 1e6).toFixed(2) + 'M';
}
function fmtMib(v) { return v == null ? '–' : v === 0 ? '0' : v < 10 ? v.toFixed(2) : v < 1000 ? v.toFixed(1) : Math.round(v).toString(); }
function fmtUs(v) {
  if (v == null) return '–';
  if (v === 0) return '0';
  if (v < 1000) return (v < 10 ? v.toFixed(2) : v.toFixed(0)) + ' µs';
  if (v < 1e6) return (v / 1e3).toFixed(v < 1e4 ? 2 : 1) + ' ms';
  return (v / 1e6).toFixed(2) + ' s';
}
function fmtBytes(b) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0; let v = b;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : +v.toFixed(v < 10 ? 2 : 1)) + ' ' + u[i];
}
function fmtAge(unixS) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - unixS));
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min';
  return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
}
// Same rules as the CLI: K, M, G, T, P are powers of 1024; no suffix = bytes.
function parseSize(text) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b?)\s*$/i.exec(text);
  if (!m) return null;
  const shift = { '': 0, k: 10, m: 20, g: 30, t: 40, p: 50 }[m[2].toLowerCase()];
  const v = parseFloat(m[1]) * Math.pow(2, shift);
  return Number.isSafeInteger(v) && v > 0 ? v : null;
}

// ----- DOM helpers --------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else if (k === 'style') e.style.cssText = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? '' : String(c)));
  return e;
}
function fillTable(id, rows, cols, empty) {
  const tb = $(id).tBodies[0];
  tb.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { class: 'empty', colspan: cols }, empty || 'none'))]));
}
function setValue(id, value, text) {
  const e = $(id); e.dataset.value = String(value); e.textContent = text;
}
function say(text, isError) {
  const m = $('message');
  m.textContent = text; m.className = isError ? 'error' : ''; m.hidden = false;
  clearTimeout(say.t); say.t = setTimeout(() => { m.hidden = true; }, isError ? 10000 : 4000);
}

// ----- API ----------------------------------------------------------------------------------
class Unauthorized extends Error {}
async function api(method, path, body) {
  const opts = { method, headers: { Authorization: 'Bearer ' + state.token }, cache: 'no-store' };
  if (body !== undefined) { opts.headers['Content-Type'] = 'application/json'; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  if (r.status === 401) { askToken('The daemon refused this token.'); throw new Unauthorized('unauthorized'); }
  if (r.status === 204) return null;
  const j = await r.json().catch(() => ({ error: r.status + ' ' + r.statusText }));
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}

// ----- token --------------------------------------------------------------------------------
function takeFragmentToken() {
  // http://127.0.0.1:8080/#token=… : store it, then drop it from the address bar and history.
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
}
function askToken(why) {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  const e = $('login-error'); e.hidden = !why; e.textContent = why || '';
  $('login').hidden = false; $('token').value = ''; $('token').focus();
}

// ----- live stream --------------------------------------------------------------------------
function setLive(on) { const b = $('live'); b.textContent = on ? 'live' : 'reconnecting'; b.className = 'badge ' + (on ? 'on' : 'off'); }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function stream() {
  while (state.running) {
    const ctl = new AbortController(); state.abort = ctl;
    try {
      const r = await fetch('/api/events', { headers: { Authorization: 'Bearer ' + state.token, Accept: 'text/event-stream' }, cache: 'no-store', signal: ctl.signal });
      if (r.status === 401) { askToken('The daemon refused this token.'); return; }
      if (!r.ok || !r.body) throw new Error('HTTP ' + r.status);
      setLive(true);
      const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) { onBlock(buf.slice(0, i)); buf = buf.slice(i + 2); }
      }
    } catch (e) { if (ctl.signal.aborted) return; }
    setLive(false);
    await sleep(2000);
  }
}
function onBlock(block) {
  let ev = 'message'; const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) ev = line.slice(6).trim();
    else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
  }
  if (ev === 'stats' && data.length) { try { onSample(JSON.parse(data.join('\n'))); } catch (e) { /* ignore a bad event */ } }
}

function onSample(s) {
  if (s.seq <= state.lastSeq) { if (s.seq < state.lastSeq - 1) state.samples = []; else return; } // daemon restarted
  state.lastSeq = s.seq;
  state.samples.push(s);
  if (state.samples.length > HISTORY) state.samples.shift();
  let ri = 0, wi = 0, rm = 0, wm = 0, p99 = null;
  for (const v of s.volumes) {
    ri += v.read_iops; wi += v.write_iops; rm += v.read_mib_s; wm += v.write_mib_s;
    if (v.write_p99_us != null) p99 = Math.max(p99 || 0, v.write_p99_us);
  }
  setValue('total-read-iops', ri, fmtCount(ri));
  setValue('total-write-iops', wi, fmtCount(wi));
  setValue('total-read-mib', rm, fmtMib(rm));
  setValue('total-write-mib', wm, fmtMib(wm));
  setValue('max-write-p99', p99 || 0, fmtUs(p99));
  setValue('nbd-clients', s.nbd_clients, s.nbd_clients);
  document.body.dataset.seq = String(s.seq);
  drawCharts();
  renderRates(s);
}

// ----- charts -------------------------------------------------------------------------------
function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
function drawChart(canvas, series, fmt, fixedMax) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const L = 58, R = 8, T = 8, B = 18, pw = w - L - R, ph = h - T - B;
  let max = 0;
  for (const s of series) for (const v of s.values) if (v != null && v > max) max = v;
  max = fixedMax || niceMax(max * 1.1);
  ctx.font = '11px system-ui, sans-serif'; ctx.fillStyle = '#8593a3'; ctx.strokeStyle = '#26313d'; ctx.lineWidth = 1;
  ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  for (let i = 0; i <= 4; i++) {
    const y = T + ph - (ph * i) / 4;
    ctx.beginPath(); ctx.moveTo(L, Math.round(y) + 0.5); ctx.lineTo(L + pw, Math.round(y) + 0.5); ctx.stroke();
    ctx.fillText(fmt((max * i) / 4), L - 6, y);
  }
  // The time axis spans the samples we have: at least MIN_SPAN seconds, at most HISTORY.
  const span = Math.max(MIN_SPAN, Math.min(HISTORY, state.samples.length));
  ctx.textBaseline = 'top';
  for (const t of [span, span / 2, 0]) {
    ctx.textAlign = t === span ? 'left' : t === 0 ? 'right' : 'center';
    ctx.fillText(t === 0 ? 'now' : '-' + (t >= 60 && t % 60 === 0 ? t / 60 + ' min' : Math.round(t) + ' s'), L + pw - (pw * t) / span, T + ph + 4);
  }
  const dx = pw / (span - 1);
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.6; ctx.setLineDash(s.dash ? [5, 4] : []);
    ctx.beginPath();
    let pen = false;
    const off = span - s.values.length;
    s.values.forEach((v, i) => {
      if (v == null) { pen = false; return; }
      const x = L + (off + i) * dx, y = T + ph - (ph * Math.min(v, max)) / max;
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
  }
  ctx.setLineDash([]);
}
function legend(id, items) {
  const key = JSON.stringify(items);
  const e = $(id);
  if (e.dataset.key === key) return;
  e.dataset.key = key;
  e.replaceChildren(...items.map(([name, color]) => el('span', {}, el('i', { style: 'background:' + color }), name)));
}
function volumeColor(name, names) { return COLORS[names.indexOf(name) % COLORS.length]; }
function drawCharts() {
  const ss = state.samples;
  if (!ss.length) return;
  const names = [...new Set(ss.flatMap((s) => s.volumes.map((v) => v.name)))].sort();
  const col = (name, f) => ss.map((s) => { const v = s.volumes.find((x) => x.name === name); return v ? f(v) : null; });
  const pairs = (f1, f2) => names.flatMap((n) => [
    { color: volumeColor(n, names), values: col(n, f1) },
    { color: volumeColor(n, names), values: col(n, f2), dash: true },
  ]);
  const vlegend = names.map((n) => [n, volumeColor(n, names)]);
  drawChart($('chart-iops'), pairs((v) => v.read_iops, (v) => v.write_iops), fmtCount);
  legend('legend-iops', vlegend);
  drawChart($('chart-mib'), pairs((v) => v.read_mib_s, (v) => v.write_mib_s), fmtMib);
  legend('legend-mib', vlegend);
  const lat = names.flatMap((n) => [
    { color: volumeColor(n, names), values: col(n, (v) => v.read_p50_us ?? v.write_p50_us) },
    { color: volumeColor(n, names), values: col(n, (v) => Math.max(v.read_p99_us || 0, v.write_p99_us || 0) || null), dash: true },
  ]);
  drawChart($('chart-lat'), lat, fmtUs);
  legend('legend-lat', vlegend);
  const ids = [...new Set(ss.flatMap((s) => s.reactors.map((r) => r.id)))].sort((a, b) => a - b);
  const cpu = ids.map((id, i) => ({ color: COLORS[i % COLORS.length], values: ss.map((s) => { const r = s.reactors.find((x) => x.id === id); return r ? r.busy_percent : null; }) }));
  drawChart($('chart-cpu'), cpu, (v) => v.toFixed(0) + '%', 100);
  const last = ss[ss.length - 1];
  legend('legend-cpu', ids.map((id, i) => { const r = last.reactors.find((x) => x.id === id); return ['reactor ' + id + (r && r.core != null ? ' (core ' + r.core + ')' : ''), COLORS[i % COLORS.length]]; }));
}

// ----- tables -------------------------------------------------------------------------------
function renderRates(s) {
  renderVolumes();
  fillTable('reactors', s.reactors.map((r) => el('tr', {},
    el('td', {}, r.id), el('td', {}, r.core ?? '–'),
    el('td', {}, el('span', { class: 'bar' }, el('span', { style: 'width:' + Math.min(100, r.busy_percent).toFixed(0) + '%' })), r.busy_percent.toFixed(1) + '%'),
    el('td', { class: 'num' }, r.ops_in_flight), el('td', { class: 'num' }, fmtCount(r.parks_per_s)), el('td', { class: 'num' }, fmtCount(r.work_per_s)),
    el('td', { class: 'dim' }, r.parked ? 'parked' : 'running'))), 7);
}
function renderVolumes() {
  const last = state.samples[state.samples.length - 1];
  const rate = (n) => (last ? last.volumes.find((v) => v.name === n) : null) || {};
  fillTable('volumes', state.volumes.map((v) => {
    const r = rate(v.name);
    const pct = v.size_bytes ? (100 * v.allocated_bytes) / v.size_bytes : 0;
    return el('tr', { 'data-volume': v.name },
      el('td', {}, el('strong', {}, v.name)), el('td', {}, v.device), el('td', { class: 'num' }, fmtBytes(v.size_bytes)),
      el('td', {}, el('span', { class: 'bar' }, el('span', { style: 'width:' + Math.min(100, pct).toFixed(1) + '%' })), fmtBytes(v.allocated_bytes) + ' (' + pct.toFixed(1) + '%)'),
      el('td', { class: 'num' }, fmtCount(r.read_iops)), el('td', { class: 'num' }, fmtCount(r.write_iops)),
      el('td', { class: 'num' }, fmtMib(r.read_mib_s) + ' / ' + fmtMib(r.write_mib_s)),
      el('td', { class: 'num' }, fmtUs(r.read_p99_us) + ' / ' + fmtUs(r.write_p99_us)),
      el('td', { class: 'num' }, v.nbd_clients), el('td', {}, v.read_only ? 'read-only' : 'read-write'),
      el('td', {}, el('button', { type: 'button', class: 'small', onclick: () => growVolume(v) }, 'Grow'),
        el('button', { type: 'button', class: 'danger', onclick: () => deleteVolume(v) }, 'Delete')));
  }), 11);
}
async function refresh() {
  try {
    const [status, volumes, devices, exports, clients] = await Promise.all([
      api('GET', '/api/status'), api('GET', '/api/volumes'), api('GET', '/api/devices'), api('GET', '/api/exports'), api('GET', '/api/clients')]);
    $('version').textContent = 'v' + status.version;
    $('summary').textContent = `up ${fmtAge(Date.now() / 1000 - status.uptime_s)} · ${status.reactors.length || '…'} reactor(s) · ${status.devices} device(s) · ${status.volumes} volume(s)`;
    state.volumes = volumes;
    renderVolumes();
    fillTable('devices', devices.map((d) => {
      const pct = d.total_chunks ? (100 * d.used_chunks) / d.total_chunks : 0;
      return el('tr', {},
        el('td', {}, el('strong', {}, d.name)), el('td', {}, d.kind + (d.persistent ? '' : ' (volatile)')),
        el('td', { title: d.profile.description }, d.profile.name),
        el('td', { class: 'num' }, fmtBytes(d.size_bytes)),
        el('td', { class: 'num' }, d.profile.logical_block_size_bytes + ' / ' + d.profile.physical_block_size_bytes),
        el('td', { class: 'num' }, fmtBytes(d.chunk_size_bytes)),
        el('td', {}, el('span', { class: 'bar' }, el('span', { style: 'width:' + pct.toFixed(1) + '%' })), d.used_chunks + ' / ' + d.total_chunks),
        el('td', {}, el('span', { class: 'badge ' + d.health.status, title: d.health.metadata_warning || '' }, d.health.status)),
        el('td', { class: 'num' }, d.health.read_errors + ' / ' + d.health.write_errors + ' / ' + d.health.flush_errors));
    }), 9);
    const sel = document.querySelector('#create select[name=device]');
    const names = devices.map((d) => d.name);
    if (sel.dataset.key !== names.join(',')) { sel.dataset.key = names.join(','); sel.replaceChildren(...names.map((n) => el('option', { value: n }, n))); }
    $('listeners').textContent = exports.listeners.length ? 'on ' + exports.listeners.join(', ') : '';
    fillTable('exports', exports.exports.map((x) => el('tr', {},
      el('td', {}, x.name), el('td', {}, el('code', {}, x.uris[0] || '–')), el('td', {}, x.read_only ? 'read-only' : 'read-write'), el('td', { class: 'num' }, x.clients))), 4);
    fillTable('clients', clients.map((c) => el('tr', {},
      el('td', {}, c.id), el('td', {}, c.peer), el('td', {}, c.export), el('td', { class: 'num' }, fmtAge(c.connected_unix_s)),
      el('td', { class: 'num' }, fmtCount(c.requests)), el('td', { class: 'num' }, fmtBytes(c.bytes_read)), el('td', { class: 'num' }, fmtBytes(c.bytes_written)))), 7);
    await refreshUblk(status);
    await refreshReplication();
  } catch (e) {
    if (!(e instanceof Unauthorized)) say('Refreshing failed: ' + e.message, true);
  }
}

// Fetched on its own: a failing /api/ublk must not blank the other tables. When there is no
// device, the reason ublk cannot be used here (from the API's error or the status) is shown.
async function refreshUblk(status) {
  let list = [], why = status.ublk_unavailable;
  try { list = await api('GET', '/api/ublk'); } catch (e) { if (e instanceof Unauthorized) throw e; why = e.message; }
  fillTable('ublk', list.map((u) => el('tr', { 'data-volume': u.volume },
    el('td', {}, el('code', {}, u.path)), el('td', {}, u.volume), el('td', { class: 'num' }, u.queues), el('td', { class: 'num' }, u.queue_depth),
    el('td', {}, u.copy_mode || ''),
    el('td', {}, u.state + (u.recovered ? ' (recovered)' : '')),
    el('td', { class: 'num' }, fmtCount(u.stats.reads) + ' / ' + fmtCount(u.stats.writes)))), 7, why ? 'none — ' + why : 'none');
}

// Replication: one row per peer of each replicated volume (from /api/replication, polled with
// the other tables: the status carries its own resync rate and ETA). Fetched on its own like
// ublk, so a failure there blanks nothing else.
function fmtEta(s) {
  if (s == null || !isFinite(s)) return '';
  s = Math.round(s);
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
  return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
}
function resyncCell(r) {
  if (!r) return el('td', { class: 'dim' }, '–');
  const pct = r.total_bytes ? Math.min(100, (100 * r.done_bytes) / r.total_bytes) : 100;
  const parts = [pct.toFixed(1) + '%'];
  if (r.rate_bytes_per_s > 0) parts.push(fmtBytes(Math.round(r.rate_bytes_per_s)) + '/s');
  if (r.eta_s != null) parts.push('ETA ' + fmtEta(r.eta_s));
  return el('td', { class: 'resync', 'data-percent': pct.toFixed(1) },
    el('span', { class: 'bar' }, el('span', { style: 'width:' + pct.toFixed(1) + '%' })), parts.join(' · '));
}
async function refreshReplication() {
  let status;
  try { status = await api('GET', '/api/replication'); } catch (e) {
    if (e instanceof Unauthorized) throw e;
    fillTable('replication', [], 10, 'unknown — ' + e.message); return;
  }
  $('replication-node').textContent = status.volumes.length ? `node ${status.node_id}${status.node_name ? ' (' + status.node_name + ')' : ''} · cluster ${status.cluster} · peers connect to ${status.listen}` : '';
  const rows = [];
  for (const v of status.volumes) {
    const volumeAction = v.role === 'primary'
      ? el('button', { type: 'button', class: 'danger', onclick: () => demoteVolume(v) }, 'Demote')
      : el('button', { type: 'button', class: 'small', onclick: () => promoteVolume(v) }, 'Promote');
    const role = el('td', { title: v.generation ? 'generation ' + v.generation : '' },
      v.role + (v.exportable ? ' ' : ' (not exportable) '), volumeAction);
    const peers = v.peers.length ? v.peers : [null];
    peers.forEach((p, i) => {
      const first = i === 0;
      const cells = [el('td', {}, first ? el('strong', {}, v.volume) : ''), first ? role : el('td', {})];
      if (!p) {
        cells.push(el('td', { class: 'dim', colspan: 8 }, 'no peers'));
        rows.push(el('tr', { 'data-replicated': v.volume }, ...cells));
        return;
      }
      // Only a primary sends to its peers: suspend and resume are a primary's commands.
      const suspended = p.state === 'suspended';
      const peerAction = v.role !== 'primary' ? '' : el('button', { type: 'button', class: 'small peer-action', onclick: () => peerCommand(v.volume, p.node, suspended ? 'resume' : 'suspend') }, suspended ? 'Resume' : 'Suspend');
      cells.push(
        // The full id (what the CLI takes) is in the tooltip; 8 digits tell peers apart.
        el('td', { title: p.node + ' at ' + p.address }, el('code', {}, p.node.slice(0, 8) + '…')), el('td', {}, p.mode),
        el('td', {}, el('span', { class: 'badge peer-' + p.state }, p.state)),
        el('td', { class: 'num' }, fmtBytes(p.dirty_bytes)),
        el('td', { class: 'num' }, fmtBytes(p.lag_bytes) + (p.lag_ms != null ? ' / ' + fmtUs(p.lag_ms * 1000) : '')),
        resyncCell(p.resync), el('td', { class: 'reason' }, p.reason || ''),
        el('td', {}, peerAction));
      rows.push(el('tr', { 'data-replicated': v.volume, 'data-node': p.node, 'data-state': p.state }, ...cells));
    });
  }
  fillTable('replication', rows, 10, 'no replicated volumes');
}

// ----- actions ------------------------------------------------------------------------------
// Runs an action; says the daemon's own line when it answers `{"message": …}`, else `what`.
async function act(what, f) {
  try { const r = await f(); say((r && r.message) || what); await refresh(); } catch (e) { if (!(e instanceof Unauthorized)) say(e.message, true); }
}
function growVolume(v) {
  const text = prompt(`Grow volume ${v.name} (now ${fmtBytes(v.size_bytes)}, at most ${fmtBytes(v.max_size_bytes)}) to:`, '');
  if (!text) return;
  const size = parseSize(text);
  if (!size) { say(`"${text}" is not a size (e.g. 20G)`, true); return; }
  if (!confirm(`Grow ${v.name} from ${fmtBytes(v.size_bytes)} to ${fmtBytes(size)}? A volume cannot be shrunk.`)) return;
  act(`Volume ${v.name} grown to ${fmtBytes(size)}.`, () => api('POST', '/api/volumes/' + encodeURIComponent(v.name) + '/grow', { size_bytes: size }));
}
function deleteVolume(v) {
  if (!confirm(`Delete volume ${v.name}? Its ${fmtBytes(v.allocated_bytes)} of data are destroyed.`)) return;
  act(`Volume ${v.name} deleted.`, () => api('DELETE', '/api/volumes/' + encodeURIComponent(v.name)));
}
// Promotion from the page never forces: forcing (a primary is still connected) is disaster
// recovery, left to `ringblock volume promote --force` and its warning.
function promoteVolume(v) {
  if (!confirm(`Promote this node's copy of ${v.volume} to primary? It then serves clients and sends its writes to the other copies.`)) return;
  act(`Volume ${v.volume} promoted.`, () => api('POST', '/api/volumes/' + encodeURIComponent(v.volume) + '/promote', { force: false }));
}
function demoteVolume(v) {
  if (!confirm(`Demote this node's copy of ${v.volume} to a replica? It stops serving clients (refused while clients are connected).`)) return;
  act(`Volume ${v.volume} demoted.`, () => api('POST', '/api/volumes/' + encodeURIComponent(v.volume) + '/demote'));
}
function peerCommand(volume, node, action) {
  const what = action === 'suspend' ? `Suspend replication of ${volume} to ${node}? Writes then only mark what it misses, until resumed.` : `Resume replication of ${volume} to ${node}? It resyncs what it missed.`;
  if (!confirm(what)) return;
  act(`Replication of ${volume} to ${node}: ${action}d.`, () => api('POST', '/api/volumes/' + encodeURIComponent(volume) + '/replicas/' + encodeURIComponent(node) + '/' + action));
}
function createVolume(ev) {
  ev.preventDefault();
  const f = ev.target;
  const field = (n) => f.elements.namedItem(n).value;
  const size = parseSize(field('size'));
  if (!size) { say(`"${field('size')}" is not a size (e.g. 10G)`, true); return; }
  const body = { name: field('name').trim(), device: field('device'), size_bytes: size };
  if (!confirm(`Create volume ${body.name} of ${fmtBytes(size)} on ${body.device}?`)) return;
  act(`Volume ${body.name} created.`, async () => { await api('POST', '/api/volumes', body); f.reset(); });
}

// ----- start --------------------------------------------------------------------------------
function stop() {
  state.running = false;
  if (state.abort) state.abort.abort();
  clearInterval(state.timer);
  setLive(false);
}
function start() {
  $('login').hidden = true;
  state.running = true;
  refresh();
  state.timer = setInterval(refresh, REFRESH_MS);
  stream();
}
document.addEventListener('DOMContentLoaded', () => {
  takeFragmentToken();
  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    state.token = $('token').value.trim();
    if (!state.token) return;
    sessionStorage.setItem(TOKEN_KEY, state.token);
    start();
  });
  $('signout').addEventListener('click', () => askToken(''));
  $('create').addEventListener('submit', createVolume);
  window.addEventListener('resize', drawCharts);
  state.token = sessionStorage.getItem(TOKEN_KEY);
  if (state.token) start(); else askToken('');
});
