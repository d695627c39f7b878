// The status page's script (served by src/ops/page/mod.rs). Reads the admin API's JSON every few
// seconds and renders it; its only write is the requeue button (POST /outbox/requeue, JSON, same
// origin). Everything shown comes from the server's answers and is put in with textContent, never as
// HTML. Labels: one table per language below; Chinese unless the address says ?lang=en.
'use strict';

const REFRESH_MS = 2000;

const STRINGS = {
  zh: {
    title: '网关状态',
    footer: '每 2 秒自动刷新 · 只读页面（除"重新排队"外不做任何更改）',
    status_ok: '正常', status_degraded: '需要关注', status_critical: '严重故障', status_unknown: '未知',
    gateway_time: '网关时间 {0}',
    clock_synchronized: '时钟已同步', clock_unsynchronized: '时钟未同步（时间可能不准）', clock_unknown: '时钟状态未知',
    conn_ok: '已刷新 {0}', conn_fail: '无法连接网关（{0}），上次成功刷新 {1}', conn_never: '从未',
    reasons_title: '健康状况', reasons_none: '一切正常。',
    reason: {
      login_failing: 'Panda 拒绝了登录用户名或密码：工单送不出去（记录都保留）。',
      store_failed: '状态数据库故障：暂不记录、不送出，正在自动重新打开。',
      disk_low: '磁盘快满了：新的阀门状态暂不记录。',
      outbox_full: '发件箱已满：新的阀门状态暂不记录。',
      outbox_filling: '发件箱快满了：工单送出跟不上。',
      delivery_failing: '工单连续送出失败（网络或服务器问题）：记录都保留，自动重试。',
      records_held: '服务器拒收了部分记录：暂缓后单独重试。',
      dead_letters: '有被服务器拒收的死信：在服务器上修正原因后点"重新排队"。',
      dead_letters_full: '死信数已达上限：新被拒收的记录留在发件箱中。',
      corrupt_entries: '状态数据库中有无法读取的条目，已放到一边。',
      oldest_record_age: '最早的排队记录等待太久：工单送不出去。',
      bus_down: '总线无法打开：这条线上的表都读不到。',
      meters_offline: '有水表不应答：检查接线、站号、波特率和校验位。',
      station_failing: '网关内部处理反复出错（程序缺陷），请报告。',
      station_restarted: '网关内部处理出过错，已自动恢复。',
    },
    buses_title: '总线', buses_none: '没有总线。',
    bus_name: '总线', bus_link: '连接', bus_meters: '在线表数', bus_round: '轮询用时 / 周期',
    bus_requests: '请求数', bus_errors: '错误（按类型）',
    bus_up: '已连接', bus_down: '未连接', bus_untried: '尚未连接',
    err_timeouts: '超时', err_exceptions: '异常应答', err_protocol: '报文错误', err_transport: '传输错误',
    err_connect: '连接失败', err_reconnects: '重连',
    round_over: '超过周期',
    meters_title: '水表', meters_none: '没有水表。',
    meter_no: '表号', meter_customer: '用户', meter_link: '在线', meter_valve: '阀门',
    meter_readings: '读数', meter_answer: '应答时间', meter_error: '最近错误',
    online: '在线', offline: '离线', offline_since: '自 {0} 起', last_answer: '最后应答在 {0}前',
    never_answered: '从未应答', retry_every: '每 {0} 重试一次',
    valve_unread: '尚未读到', valve_pending: '待确认（已记录：{0}）', changed_at: '变化于 {0}',
    answer_of: '最慢 {0} / 超时 {1}', no_answer: '尚无应答',
    failure: {
      timeout: '超时无应答', exception: '异常应答', protocol: '应答报文错误', transport: '传输错误',
      bus_down: '总线未连接', decode: '数值无法解析',
    },
    exception_code: '代码 {0}', ago: '{0}前', none: '无',
    outbox_title: '发件箱',
    ob_queued: '排队中', ob_records: '{0} 条（{1}），上限 {2} 条', ob_oldest: '最早记录已等待',
    ob_refusing: '拒收新状态', ob_refusing_yes: '是：新的阀门状态暂不记录', ob_refusing_disk: '是：磁盘空间不足',
    ob_refusing_no: '否', ob_dead: '死信', ob_delivered: '已送出（本次启动以来）', ob_last_error: '最近送出错误',
    ob_error: '无法读取发件箱：{0}',
    dead_title: '死信（服务器拒收的记录）', dead_none: '没有死信。',
    dead_id: '编号', dead_meter: '表号', dead_event: '事件', dead_msg: '服务器消息', dead_attempts: '尝试次数',
    dead_died: '转为死信时间', requeue: '重新排队', requeued: '记录 {0} 已重新排队，将再次送出。',
    requeue_failed: '重新排队失败：{0}',
    deliveries_title: '最近送出的工单', deliveries_none: '本次启动以来还没有送出工单。',
    del_time: '送出时间', del_event: '事件', del_meter: '表号', del_customer: '用户', del_to: '内容',
    unit_s: '秒', unit_min: '分', unit_h: '小时', unit_d: '天', sep: '',
  },
  en: {
    title: 'Gateway status',
    footer: 'Refreshes every 2 s · read-only (nothing is changed except by "Requeue")',
    status_ok: 'OK', status_degraded: 'Needs a look', status_critical: 'Critical', status_unknown: 'Unknown',
    gateway_time: 'gateway time {0}',
    clock_synchronized: 'Clock synchronized', clock_unsynchronized: 'Clock not synchronized (times may be wrong)',
    clock_unknown: 'Clock state unknown',
    conn_ok: 'Refreshed {0}', conn_fail: 'Cannot reach the gateway ({0}); last refreshed {1}', conn_never: 'never',
    reasons_title: 'Health', reasons_none: 'All is well.',
    reason: {
      login_failing: 'Panda refuses the login username or password: nothing is delivered (every record is kept).',
      store_failed: 'The state database failed: nothing is recorded or delivered; it is reopened by itself.',
      disk_low: 'The disk is almost full: new valve states are not recorded.',
      outbox_full: 'The outbox is full: new valve states are not recorded.',
      outbox_filling: 'The outbox is filling: deliveries do not keep up.',
      delivery_failing: 'Deliveries keep failing (network or server): every record is kept and retried.',
      records_held: 'The server refused some records: they are held and retried alone.',
      dead_letters: 'The server refused records (dead letters): fix the cause on the server, then "Requeue".',
      dead_letters_full: 'The dead letters are at their bound: newly refused records stay in the outbox.',
      corrupt_entries: 'Entries of the state database could not be read and were set aside.',
      oldest_record_age: 'The oldest queued record has waited too long: deliveries are not getting through.',
      bus_down: 'A bus cannot be opened: its meters are not read.',
      meters_offline: 'Meters do not answer: check wiring, unit id, baud rate and parity.',
      station_failing: 'The gateway keeps failing internally (a bug): please report it.',
      station_restarted: 'The gateway failed internally and recovered by itself.',
    },
    buses_title: 'Buses', buses_none: 'No buses.',
    bus_name: 'Bus', bus_link: 'Connection', bus_meters: 'Meters online', bus_round: 'Round time / interval',
    bus_requests: 'Requests', bus_errors: 'Errors by kind',
    bus_up: 'connected', bus_down: 'not connected', bus_untried: 'not tried yet',
    err_timeouts: 'timeouts', err_exceptions: 'exceptions', err_protocol: 'bad answers', err_transport: 'transport',
    err_connect: 'failed opens', err_reconnects: 'reconnects',
    round_over: 'longer than the interval',
    meters_title: 'Meters', meters_none: 'No meters.',
    meter_no: 'Meter', meter_customer: 'Customer', meter_link: 'Online', meter_valve: 'Valve',
    meter_readings: 'Readings', meter_answer: 'Answer time', meter_error: 'Last error',
    online: 'online', offline: 'offline', offline_since: 'since {0}', last_answer: 'last answer {0} ago',
    never_answered: 'never answered', retry_every: 'retried every {0}',
    valve_unread: 'not read yet', valve_pending: 'to be confirmed (recorded: {0})', changed_at: 'changed {0}',
    answer_of: 'slowest {0} / timeout {1}', no_answer: 'no answer yet',
    failure: {
      timeout: 'no answer (timeout)', exception: 'exception answer', protocol: 'bad answer', transport: 'transport error',
      bus_down: 'bus not connected', decode: 'value not usable',
    },
    exception_code: 'code {0}', ago: '{0} ago', none: 'none',
    outbox_title: 'Outbox',
    ob_queued: 'Queued', ob_records: '{0} records ({1}), bound {2}', ob_oldest: 'Oldest record waiting',
    ob_refusing: 'Refusing new states', ob_refusing_yes: 'yes: new valve states are not recorded',
    ob_refusing_disk: 'yes: the disk is almost full', ob_refusing_no: 'no', ob_dead: 'Dead letters',
    ob_delivered: 'Delivered since start', ob_last_error: 'Last delivery error', ob_error: 'Cannot read the outbox: {0}',
    dead_title: 'Dead letters (records the server refused)', dead_none: 'No dead letters.',
    dead_id: 'Id', dead_meter: 'Meter', dead_event: 'Event', dead_msg: "Server's message", dead_attempts: 'Attempts',
    dead_died: 'Dead since', requeue: 'Requeue', requeued: 'Record {0} requeued: it is delivered again.',
    requeue_failed: 'Requeue failed: {0}',
    deliveries_title: 'Work orders delivered last', deliveries_none: 'No work order delivered since start.',
    del_time: 'Delivered', del_event: 'Event', del_meter: 'Meter', del_customer: 'Customer', del_to: 'Reports',
    unit_s: 's', unit_min: 'min', unit_h: 'h', unit_d: 'd', sep: ' ',
  },
};

const LANG = new URLSearchParams(location.search).get('lang') === 'en' ? 'en' : 'zh';
const S = STRINGS[LANG];

/** The string `key` with {0}, {1}, … replaced by `args`. */
function t(key, ...args) {
  const text = S[key] === undefined ? key : S[key];
  return text.replace(/\{(\d+)\}/g, (_, i) => String(args[Number(i)]));
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.dataset[k.slice(5).replace(/-(\w)/g, (_, c) => c.toUpperCase())] = v;
    else e.setAttribute(k, v);
  }
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

/** "3 秒" / "5 min 3 s": a duration in seconds, to two units. */
function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return '—';
  if (seconds < 10 && Math.abs(seconds - Math.round(seconds)) >= 0.05) {
    return (Math.max(0, seconds)).toFixed(1) + S.sep + S.unit_s;
  }
  let s = Math.max(0, Math.round(seconds));
  const parts = [];
  for (const [size, unit] of [[86400, 'unit_d'], [3600, 'unit_h'], [60, 'unit_min'], [1, 'unit_s']]) {
    if (s >= size || (size === 1 && parts.length === 0)) {
      parts.push(Math.floor(s / size) + S.sep + S[unit]);
      s %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(' ');
}

function ms(v) {
  if (v === null || v === undefined) return '—';
  return (v < 1 ? v.toFixed(2) : v < 10 ? v.toFixed(1) : Math.round(v)) + ' ms';
}

/** "05-01 08:00:03" of an RFC 3339 time (the site's zone, as the gateway wrote it); the whole in a title. */
function shortTime(text) {
  const m = /^\d{4}-(\d\d)-(\d\d)T(\d\d:\d\d:\d\d)/.exec(text || '');
  return m ? `${m[1]}-${m[2]} ${m[3]}` : (text || '—');
}

function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/** Cell `i` of row `tr`, created with `data-field=field` if missing, emptied for new content. */
function cell(tr, i, field, cls) {
  let td = tr.cells[i];
  if (!td) {
    td = el('td', { 'data-field': field });
    tr.appendChild(td);
  }
  td.className = cls || '';
  return td;
}

/** Put `parts` ([text, class] pairs or nodes) into `td` unless it already shows the same. */
function fill(td, parts) {
  const fresh = document.createDocumentFragment();
  for (const p of parts) {
    if (p === null || p === undefined) continue;
    if (p instanceof Node) fresh.appendChild(p);
    else if (Array.isArray(p)) fresh.appendChild(el('span', { class: p[1] || '' }, p[0]));
    else fresh.appendChild(document.createTextNode(p));
  }
  const probe = document.createElement('td');
  probe.appendChild(fresh.cloneNode(true));
  if (probe.innerHTML !== td.innerHTML) {
    td.replaceChildren(fresh);
  }
}

/**
 * Keep the rows of `tbody` in step with `items`: a row per item, keyed by `keyOf(item)` (its
 * data-key), updated in place by `render(item, tr)` (so a button under the pointer is not replaced),
 * in the order of `items`; rows of items gone are removed. `noneId`: the "nothing" note shown when empty.
 */
function syncRows(tbody, items, keyOf, render, noneId) {
  const old = new Map();
  for (const tr of Array.from(tbody.rows)) old.set(tr.dataset.key, tr);
  let prev = null;
  for (const item of items) {
    const key = String(keyOf(item));
    let tr = old.get(key);
    if (tr) old.delete(key);
    else tr = el('tr', { 'data-key': key });
    render(item, tr);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== tr) tbody.insertBefore(tr, want);
    prev = tr;
  }
  for (const tr of old.values()) tr.remove();
  if (noneId) document.getElementById(noneId).hidden = items.length > 0;
  tbody.closest('table').hidden = items.length === 0;
}

async function getJson(path) {
  const r = await fetch(path, { cache: 'no-store', headers: { Accept: 'application/json' } });
  let body = null;
  try {
    body = await r.json();
  } catch (e) {
    throw new Error(`${path}: HTTP ${r.status}`);
  }
  // /healthz answers 503 with its JSON when critical: that is an answer, not a failure.
  if (!r.ok && path !== '/healthz') {
    throw new Error((body && body.error) || `${path}: HTTP ${r.status}`);
  }
  return body;
}

// === sections ===

function renderHealth(h) {
  setText(document.getElementById('site'), h.site || '');
  document.title = `${h.site || 'fieldgate'} · ${S.title}`;
  const badge = document.getElementById('health');
  badge.dataset.status = h.status;
  setText(badge, S['status_' + h.status] || h.status);

  const clock = document.getElementById('clock');
  const sync = (h.clock && h.clock.sync) || 'unknown';
  clock.dataset.sync = sync;
  // The gateway's time (sent in UTC) in this browser's zone, to compare with a watch.
  const at = new Date((h.clock && h.clock.now) || NaN);
  const shown = isNaN(at) ? '—' : at.toLocaleString(LANG === 'en' ? 'en-GB' : 'zh-CN', { hour12: false });
  setText(clock, `${S['clock_' + sync] || sync} · ${t('gateway_time', shown)}`);

  const list = document.getElementById('reasons');
  syncRowsList(list, h.reasons || []);
  document.getElementById('reasons-none').hidden = (h.reasons || []).length > 0;
}

function syncRowsList(list, reasons) {
  list.replaceChildren(...reasons.map((r) => {
    const li = el('li', { 'data-code': r.code, 'data-status': r.status });
    li.appendChild(el('span', { class: 'summary' }, S.reason[r.code] || r.code));
    li.appendChild(el('span', { class: 'detail' }, r.message));
    return li;
  }));
}

function renderBuses(buses) {
  syncRows(document.querySelector('#buses tbody'), buses, (b) => b.name, (b, tr) => {
    tr.dataset.bus = b.name;
    fill(cell(tr, 0, 'name'), [b.name, el('span', { class: 'sub' }, `${b.transport} ${b.endpoint}`)]);
    const link = !b.tried ? ['bus_untried', 'muted'] : b.up ? ['bus_up', 'ok'] : ['bus_down', 'bad'];
    tr.dataset.up = String(b.up);
    fill(cell(tr, 1, 'link'), [[S[link[0]], link[1]]]);
    const allOnline = b.meters_online === b.meters;
    fill(cell(tr, 2, 'meters', 'num'), [[`${b.meters_online} / ${b.meters}`, allOnline ? '' : 'warn']]);
    const interval = b.poll_interval_seconds || 0;
    const ratio = interval > 0 ? b.last_round_seconds / interval : 0;
    const bar = el('span', { class: 'bar' + (ratio > 1 ? ' over' : '') });
    const inner = el('span');
    inner.style.width = Math.min(100, Math.round(ratio * 100)) + '%';
    bar.appendChild(inner);
    fill(cell(tr, 3, 'round'), [
      `${ms(b.last_round_seconds * 1000)} / ${ms(interval * 1000)}`,
      ratio > 1 ? [' ' + S.round_over, 'bad'] : null,
      bar,
    ]);
    fill(cell(tr, 4, 'requests', 'num'), [String(b.requests)]);
    const kinds = [
      ['err_timeouts', b.timeouts], ['err_exceptions', b.exceptions], ['err_protocol', b.protocol_errors],
      ['err_transport', b.transport_errors], ['err_connect', b.connect_failures], ['err_reconnects', b.reconnects],
    ];
    fill(cell(tr, 5, 'errors'), kinds.map(([k, n], i) =>
      [`${i ? ' · ' : ''}${S[k]} ${n}`, n > 0 && k !== 'err_reconnects' ? 'warn' : '']));
  }, 'buses-none');
}

function renderMeters(meters) {
  syncRows(document.querySelector('#meters tbody'), meters, (m) => m.meter_no, (m, tr) => {
    tr.dataset.meter = m.meter_no;
    tr.dataset.online = String(m.online);
    tr.dataset.state = m.state || '';
    fill(cell(tr, 0, 'meter'), [m.meter_no, el('span', { class: 'sub' }, `${m.bus} · ${m.unit}`)]);
    fill(cell(tr, 1, 'customer'), [m.customer || '—']);
    if (m.online) {
      fill(cell(tr, 2, 'link'), [[S.online, 'ok']]);
    } else {
      // The outage's start is stored when link rules are configured; otherwise the last answer tells.
      const since = m.offline_since ? t('offline_since', shortTime(m.offline_since))
        : m.last_sample_age_seconds !== null && m.last_sample_age_seconds !== undefined
          ? t('last_answer', duration(m.last_sample_age_seconds)) : S.never_answered;
      const retry = m.retry_every_seconds ? t('retry_every', duration(m.retry_every_seconds)) : '';
      fill(cell(tr, 2, 'link'), [[S.offline, 'bad'], el('span', { class: 'sub' }, [since, retry].filter(Boolean).join(' · '))]);
    }
    const valve = m.state === null || m.state === undefined ? [S.valve_unread, 'muted'] : [m.state, 'valve'];
    const pending = m.stored_state && m.state && m.stored_state !== m.state
      ? el('span', { class: 'sub warn' }, t('valve_pending', m.stored_state)) : null;
    const changed = m.last_change ? el('span', { class: 'sub' }, t('changed_at', shortTime(m.last_change))) : null;
    fill(cell(tr, 3, 'valve'), [valve, pending, changed]);
    const readings = Object.entries(m.readings || {});
    fill(cell(tr, 4, 'readings'), readings.length
      ? readings.map(([k, v], i) => el('span', { class: i ? 'sub' : '' }, `${k} ${v}`))
      : ['—']);
    const answer = cell(tr, 5, 'answer');
    if (m.answer_ms === null || m.answer_ms === undefined) {
      fill(answer, [[S.no_answer, 'muted']]);
    } else {
      fill(answer, [ms(m.answer_ms), el('span', { class: 'sub' }, t('answer_of', ms(m.answer_max_ms), ms(m.timeout_ms))),
        m.hint ? el('span', { class: 'sub warn' }, m.hint) : null]);
    }
    const f = m.last_failure;
    if (!f) {
      fill(cell(tr, 6, 'error'), [[S.none, 'muted']]);
    } else {
      const what = (S.failure[f.kind] || f.kind) + (f.exception !== null && f.exception !== undefined
        ? ` (${t('exception_code', f.exception)})` : '');
      fill(cell(tr, 6, 'error'), [[what, m.online ? 'muted' : 'bad'], el('span', { class: 'sub' }, t('ago', duration(f.age_seconds)))]);
    }
  }, 'meters-none');
}

function renderOutbox(ob, health) {
  const dl = document.getElementById('outbox');
  const sender = (health && health.sender) || {};
  const rows = [];
  if (ob.error) {
    rows.push(['error', S.ob_queued, [t('ob_error', ob.error), 'bad']]);
  } else {
    rows.push(['queued', S.ob_queued, [t('ob_records', ob.records, bytes(ob.bytes), ob.max_records), ob.records > 0 ? '' : 'muted']]);
    rows.push(['oldest', S.ob_oldest, [ob.oldest_age_seconds === null || ob.oldest_age_seconds === undefined ? '—' : duration(ob.oldest_age_seconds), '']]);
    const refusing = ob.refusing ? [ob.disk_low ? S.ob_refusing_disk : S.ob_refusing_yes, 'bad'] : [S.ob_refusing_no, 'ok'];
    rows.push(['refusing', S.ob_refusing, refusing]);
    rows.push(['dead', S.ob_dead, [String(ob.dead), ob.dead > 0 ? 'warn' : '']]);
  }
  if (health && health.sender) {
    rows.push(['delivered', S.ob_delivered, [String(sender.delivered), '']]);
    rows.push(['last_error', S.ob_last_error, [sender.last_error || S.none, sender.last_error ? 'warn' : 'muted']]);
  }
  const fresh = document.createDocumentFragment();
  for (const [field, label, [value, cls]] of rows) {
    fresh.appendChild(el('dt', { 'data-field': field }, label));
    fresh.appendChild(el('dd', { 'data-field': field, class: cls }, value));
  }
  dl.dataset.refusing = String(!!ob.refusing);
  dl.replaceChildren(fresh);
}

function renderDead(dead) {
  syncRows(document.querySelector('#dead tbody'), dead, (d) => d.id, (d, tr) => {
    tr.dataset.id = String(d.id);
    tr.dataset.meter = d.meter_no;
    fill(cell(tr, 0, 'id', 'num'), [String(d.id)]);
    fill(cell(tr, 1, 'meter'), [d.meter_no]);
    fill(cell(tr, 2, 'event'), [d.event_name]);
    fill(cell(tr, 3, 'msg', 'bad'), [d.msg]);
    fill(cell(tr, 4, 'attempts', 'num'), [String(d.attempts)]);
    fill(cell(tr, 5, 'died'), [shortTime(d.died_at)]);
    const td = cell(tr, 6, 'action');
    if (!td.firstChild) {
      const button = el('button', { type: 'button', 'data-requeue': String(d.id) }, S.requeue);
      button.addEventListener('click', () => requeue(d.id, button));
      td.appendChild(button);
    }
  }, 'dead-none');
}

function renderDeliveries(list) {
  syncRows(document.querySelector('#deliveries tbody'), list, (d) => d.id, (d, tr) => {
    tr.dataset.id = String(d.id);
    tr.dataset.meter = d.meter_no;
    tr.dataset.event = d.event_name;
    const time = cell(tr, 0, 'time');
    time.title = d.delivered_at;
    fill(time, [shortTime(d.delivered_at)]);
    fill(cell(tr, 1, 'event'), [d.event_name]);
    fill(cell(tr, 2, 'meter'), [d.meter_no]);
    fill(cell(tr, 3, 'customer'), [d.customer || '—']);
    fill(cell(tr, 4, 'to'), [d.to]);
  }, 'deliveries-none');
}

// === the one write ===

async function requeue(id, button) {
  button.disabled = true;
  const status = document.getElementById('requeue-status');
  try {
    const r = await fetch('/outbox/requeue', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify({ id }),
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    status.dataset.ok = 'true';
    setText(status, t('requeued', id));
  } catch (e) {
    status.dataset.ok = 'false';
    setText(status, t('requeue_failed', e.message));
    button.disabled = false;
  }
  refreshNow();
}

// === the refresh loop ===

let lastOk = null;
let timer = null;
let running = false;
let again = false;
let count = 0;

/** One refresh now, then the next after REFRESH_MS; never two at once (a call meanwhile runs one more after). */
async function loop() {
  if (running) {
    again = true;
    return;
  }
  running = true;
  clearTimeout(timer);
  timer = null;
  try {
    await refresh();
  } catch (e) {
    const conn = document.getElementById('conn');
    conn.dataset.ok = 'false';
    setText(conn, t('conn_fail', e.message, lastOk || S.conn_never));
  }
  running = false;
  if (again) {
    again = false;
    loop();
  } else {
    timer = setTimeout(loop, REFRESH_MS);
  }
}

function refreshNow() {
  loop();
}

async function refresh() {
  const parts = await Promise.allSettled([
    getJson('/healthz'), getJson('/buses'), getJson('/meters'), getJson('/outbox?limit=1'),
    getJson('/outbox/dead'), getJson('/deliveries'),
  ]);
  const [health, buses, meters, outbox, dead, deliveries] = parts;
  const ok = (p) => p.status === 'fulfilled';
  if (ok(health)) renderHealth(health.value);
  if (ok(buses)) renderBuses(buses.value);
  if (ok(meters)) renderMeters(meters.value);
  const h = ok(health) ? health.value : null;
  renderOutbox(ok(outbox) ? outbox.value : { error: outbox.reason.message }, h);
  if (ok(dead)) renderDead(dead.value);
  if (ok(deliveries)) renderDeliveries(deliveries.value);

  // The outbox answers 503 while the store is failed: said in its section, the gateway is reachable.
  const failed = parts.find((p) => !ok(p) && p !== outbox);
  const conn = document.getElementById('conn');
  const now = new Date().toLocaleTimeString(LANG === 'en' ? 'en-GB' : 'zh-CN', { hour12: false });
  if (failed) {
    conn.dataset.ok = 'false';
    setText(conn, t('conn_fail', failed.reason.message, lastOk || S.conn_never));
  } else {
    lastOk = now;
    conn.dataset.ok = 'true';
    setText(conn, t('conn_ok', now));
  }
  count += 1;
  conn.dataset.count = String(count);
}

function start() {
  document.documentElement.lang = LANG === 'en' ? 'en' : 'zh-CN';
  for (const node of document.querySelectorAll('[data-i18n]')) {
    node.textContent = S[node.dataset.i18n] || node.textContent;
  }
  for (const a of document.querySelectorAll('#lang a')) {
    if (a.dataset.lang === LANG) a.setAttribute('aria-current', 'page');
  }
  loop();
}

start();
