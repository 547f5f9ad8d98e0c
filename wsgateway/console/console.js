// ws-gateway console: a player's live event stream, publishing test events, and the
// operator's view (live counts, a presence look-up, disconnecting a player).
//
// Behaves like a real client should: on an unexpected close it reconnects after a
// capped exponential backoff with jitter (so a restarted gateway is not hit by every
// client at once), and it does not reconnect after a close that reconnecting cannot
// fix (revoked token, protocol or size errors). It resumes: every connection asks for
// ids (`last_event_id`, empty at first, then the id of the last event shown), so a
// gateway that keeps a history (-history-size) replays what was published while the page
// was away, none twice, none skipped; the page shows whether the resume recovered
// everything or, from the gateway's `gateway.missed` notice, why it could not (what
// follows the notice is every event the gateway still kept). Endpoints are found
// relative to this page's URL, so the console works behind a proxy under a path
// prefix. Tokens stay in memory: never in the URL bar, storage or the log shown on the
// page; the server token travels only in Authorization headers (a player token must be
// in /ws's query: that is how browsers open a WebSocket, and the gateway never logs it).
'use strict';

(function () {
  // The gateway's close-code catalogue (wsgateway/errors.py, README "Errors").
  const CLOSE_CODES = {
    1000: 'normal closure',
    1001: 'gateway shutting down',
    1002: 'protocol error',
    1005: 'closed without a code',
    1006: 'connection lost, or refused at the handshake (bad token, origin, too many connections, 503)',
    1007: 'invalid UTF-8',
    1008: 'token revoked or expired',
    1009: 'message too big',
    1011: 'internal error',
    4000: 'client too slow',
    4001: 'ping timeout',
    4002: 'disconnected by the server',
  };
  // Closes that a reconnect cannot fix (a new token or a client fix is needed), and an
  // operator's disconnect, which this page honours rather than undoes.
  const NO_RECONNECT = new Set([1002, 1007, 1008, 1009, 4002]);
  const WATCH_PERIOD_MS = 2000; // the operator's counts are refreshed this often
  const BACKOFF_INITIAL_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const MAX_ROWS = 500; // events kept on the page
  // A gateway that cannot honour the id says so in its first frame; one that can says
  // nothing. With no frame at all this long after the open, the resume was honoured.
  const RECOVERY_SETTLE_MS = 1000;
  const MISSED_EVENT = 'gateway.missed';

  const $ = (id) => document.getElementById(id);
  const base = new URL('.', window.location.href); // the gateway's root, whatever the prefix

  let socket = null;
  let wanted = false; // the user asked to be connected
  let attempt = 0; // reconnects since the last successful open
  let reconnectTimer = null;
  let countdownTimer = null;
  let opened = 0;
  let received = 0;
  let lastId = ''; // the id of the last event shown: the next connection resumes after it
  let lastIdToken = null; // the player token lastId belongs to (another token starts afresh)
  let resumingFrom = null; // the id the open socket resumed from, until the outcome is known
  let settleTimer = null;

  function now() {
    return new Date().toISOString().slice(11, 23); // HH:MM:SS.mmm (UTC)
  }

  function setState(state, detail) {
    $('state').dataset.state = state;
    $('state').textContent = state;
    $('state-detail').textContent = detail || '';
    $('connect').disabled = wanted;
    $('disconnect').disabled = !wanted;
  }

  function logConnection(text) {
    const row = document.createElement('tr');
    const time = document.createElement('td');
    time.textContent = now();
    const what = document.createElement('td');
    what.textContent = text;
    row.append(time, what);
    $('connection-log').prepend(row);
  }

  function describeClose(code, reason) {
    const meaning = CLOSE_CODES[code] || (code >= 4000 ? 'application close' : 'unknown');
    return code + ' ' + meaning + (reason ? ' (' + reason + ')' : '');
  }

  function socketUrl(token) {
    const url = new URL('ws', base);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = '?token=' + encodeURIComponent(token) + '&last_event_id=' + encodeURIComponent(lastId);
    return url.href;
  }

  function setRecovery(state, text) {
    $('recovery').dataset.state = state;
    $('recovery').textContent = text;
    $('last-id').textContent = lastId || 'none yet';
  }

  // The outcome of a resume, once known: `notice` is the gateway.missed payload, or null
  // when the gateway honoured the id (a first frame that is an event, or silence).
  function settleResume(notice) {
    clearTimeout(settleTimer);
    settleTimer = null;
    const from = resumingFrom;
    resumingFrom = null;
    if (notice === null) {
      setRecovery('recovered', 'recovered: resumed after ' + from + ', nothing missed');
      logConnection('recovered: resumed after ' + from);
      return;
    }
    const reason = String(notice.reason);
    if (reason === 'history_off') lastId = ''; // no ids will come: ask with none
    setRecovery('lost', 'not recovered (' + reason + '): what came after ' + from + ' may be lost; ' +
      notice.kept + ' kept event(s) follow');
    logConnection('not recovered after ' + from + ': ' + reason);
  }

  function backoffMs() {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_INITIAL_MS * 2 ** attempt);
    return Math.round(ceiling / 2 + Math.random() * ceiling / 2); // "equal jitter"
  }

  function open() {
    clearTimers();
    const token = $('player-token').value.trim();
    if (!token) {
      wanted = false;
      setState('idle', 'paste a player token first');
      return;
    }
    if (token !== lastIdToken) {
      lastId = ''; // an id is a position in one player's stream
      lastIdToken = token;
    }
    const from = lastId;
    setState('connecting', attempt ? 'attempt ' + (attempt + 1) : '');
    logConnection(from ? 'connecting, resuming after ' + from : 'connecting');
    const ws = new WebSocket(socketUrl(token));
    socket = ws;
    ws.onopen = () => {
      if (ws !== socket) return;
      attempt = 0;
      opened += 1;
      $('opened').textContent = String(opened);
      setState('open', 'receiving events');
      logConnection('open');
      if (from) {
        resumingFrom = from;
        setRecovery('resuming', 'resuming after ' + from + '…');
        settleTimer = setTimeout(() => settleResume(null), RECOVERY_SETTLE_MS);
      } else {
        setRecovery('none', 'no id to resume from yet: what was queued while offline, then live events');
      }
    };
    ws.onmessage = (message) => {
      if (ws !== socket) return;
      const frame = parseFrame(message.data);
      if (resumingFrom !== null) {
        const payload = frame && frame.event === MISSED_EVENT ? frame.payload : null;
        settleResume(payload && payload.recovered === false ? payload : null);
      }
      if (frame && typeof frame.id === 'string' && frame.id) lastId = frame.id;
      showEvent(frame, message.data);
      $('last-id').textContent = lastId || 'none yet';
    };
    ws.onclose = (close) => {
      if (ws !== socket) return;
      socket = null;
      if (resumingFrom !== null) {
        clearTimeout(settleTimer);
        resumingFrom = null;
        setRecovery('resuming', 'closed before the resume was confirmed: the next connection resumes after ' +
          (lastId || 'nothing'));
      }
      $('close-code').dataset.code = String(close.code);
      $('close-code').textContent = describeClose(close.code, close.reason);
      logConnection('closed: ' + describeClose(close.code, close.reason));
      if (!wanted) {
        setState('closed', 'disconnected');
      } else if (NO_RECONNECT.has(close.code)) {
        wanted = false;
        setState('closed', 'not reconnecting: ' + (CLOSE_CODES[close.code] || close.code));
      } else if (!$('auto-reconnect').checked) {
        wanted = false;
        setState('closed', 'reconnecting is off');
      } else {
        scheduleReconnect();
      }
    };
  }

  function scheduleReconnect() {
    const delayMs = backoffMs();
    attempt += 1;
    const due = Date.now() + delayMs;
    const tick = () => setState('reconnecting', 'in ' + ((due - Date.now()) / 1000).toFixed(1) + ' s');
    tick();
    logConnection('reconnecting in ' + (delayMs / 1000).toFixed(1) + ' s');
    countdownTimer = setInterval(tick, 100);
    reconnectTimer = setTimeout(open, delayMs);
  }

  function clearTimers() {
    clearTimeout(reconnectTimer);
    clearInterval(countdownTimer);
    reconnectTimer = countdownTimer = null;
  }

  // A frame as the gateway sends it, {"event", "payload"[, "id"]}, or null when it is not one.
  function parseFrame(data) {
    try {
      const frame = JSON.parse(data);
      return frame !== null && typeof frame === 'object' && !Array.isArray(frame) ? frame : null;
    } catch (error) {
      return null;
    }
  }

  function showEvent(frame, data) {
    const event = frame ? String(frame.event) : '(not JSON)';
    const payload = frame ? JSON.stringify(frame.payload, null, 1) : data; // else shown as it came
    const id = frame && typeof frame.id === 'string' ? frame.id : '';
    received += 1;
    $('event-count').textContent = String(received);
    const row = document.createElement('tr');
    row.className = event === MISSED_EVENT ? 'event notice' : 'event';
    row.dataset.event = event;
    row.dataset.id = id;
    for (const [name, text] of [['time', now()], ['name', event], ['id', id], ['payload', payload]]) {
      const cell = document.createElement('td');
      cell.className = name;
      cell.textContent = text;
      row.append(cell);
    }
    const rows = $('events');
    rows.prepend(row);
    while (rows.rows.length > MAX_ROWS) rows.deleteRow(-1);
  }

  async function send(path) {
    const result = $('publish-result');
    const body = { event: $('event-name').value };
    const playerId = $('player-id').value.trim();
    if (playerId) body.player_id = /^\d+$/.test(playerId) ? Number(playerId) : playerId;
    const payloadText = $('payload').value.trim();
    try {
      body.payload = payloadText ? JSON.parse(payloadText) : null;
    } catch (error) {
      result.dataset.ok = 'false';
      result.dataset.status = '';
      result.textContent = 'payload is not valid JSON: ' + error.message;
      return;
    }
    result.dataset.ok = '';
    result.textContent = 'sending…';
    try {
      const response = await fetch(new URL(path, base), {
        method: 'POST',
        headers: {
          'Authorization': 'Bearer ' + $('server-token').value.trim(),
          'Content-Type': 'application/json',
        },
        body: JSON.stringify(body),
      });
      const text = await response.text();
      result.dataset.status = String(response.status);
      result.dataset.ok = String(response.ok);
      const retry = response.headers.get('Retry-After');
      result.textContent = now() + ' ' + path + ' → ' + response.status + ' ' + text +
        (retry ? ' (retry after ' + retry + ' s)' : '');
    } catch (error) {
      result.dataset.status = '0';
      result.dataset.ok = 'false';
      result.textContent = now() + ' ' + path + ' failed: ' + error.message;
    }
  }

  // --- the operator's view ------------------------------------------------------------
  let watchTimer = null;
  let lastSample = null; // {at, published, dropped}: this gateway's counters at the last poll

  function serverHeaders() {
    return { 'Authorization': 'Bearer ' + $('server-token').value.trim(), 'Accept': 'application/json' };
  }

  // The totals of one counter in Prometheus' text format, over all its label sets.
  function counterTotal(text, name) {
    let total = 0;
    for (const line of text.split('\n')) {
      if (line.startsWith(name + ' ') || line.startsWith(name + '{')) {
        total += Number(line.slice(line.lastIndexOf(' ') + 1)) || 0;
      }
    }
    return total;
  }

  function setWatchState(state, text) {
    $('watch-state').dataset.state = state;
    $('watch-state').textContent = text;
    $('watch').disabled = state === 'watching';
    $('unwatch').disabled = state !== 'watching';
  }

  async function poll() {
    try {
      const response = await fetch(new URL('presence', base), { headers: serverHeaders() });
      const answer = await response.json();
      if (!response.ok) {
        stopWatching('refused', 'refused: ' + response.status + ' ' + (answer.error || ''));
        return;
      }
      $('count-connections').textContent = String(answer.connections);
      $('count-players').textContent = String(answer.players);
      const metrics = await (await fetch(new URL('metrics', base))).text();
      const sample = { at: performance.now(), published: counterTotal(metrics, 'ws_messages_published_total'),
                       dropped: counterTotal(metrics, 'ws_messages_dropped_total') };
      if (lastSample) {
        const seconds = Math.max(0.001, (sample.at - lastSample.at) / 1000);
        $('rate-published').textContent = ((sample.published - lastSample.published) / seconds).toFixed(1);
        $('rate-dropped').textContent = ((sample.dropped - lastSample.dropped) / seconds).toFixed(1);
      }
      lastSample = sample;
      if (watchTimer !== null) setWatchState('watching', 'watching, updated ' + now());
    } catch (error) {
      setWatchState(watchTimer !== null ? 'watching' : 'idle', 'poll failed: ' + error.message);
    }
  }

  function startWatching() {
    stopWatching('watching', 'watching');
    lastSample = null;
    watchTimer = setInterval(poll, WATCH_PERIOD_MS);
    poll();
  }

  function stopWatching(state, text) {
    clearInterval(watchTimer);
    watchTimer = null;
    setWatchState(state, text);
  }

  async function operate(method, path) {
    const result = $('operator-result');
    const playerId = $('operator-player').value.trim();
    if (!playerId) {
      result.dataset.ok = 'false';
      result.dataset.status = '';
      result.textContent = 'type a player id first';
      return;
    }
    const headers = serverHeaders();
    const url = new URL(path, base);
    let body;
    if (method === 'GET') {
      url.search = '?player_id=' + encodeURIComponent(playerId);
    } else {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify({ player_id: /^\d+$/.test(playerId) ? Number(playerId) : playerId });
    }
    result.dataset.ok = '';
    result.textContent = 'sending…';
    try {
      const response = await fetch(url, { method, headers, body });
      result.dataset.status = String(response.status);
      result.dataset.ok = String(response.ok);
      result.textContent = now() + ' ' + method + ' /' + path + ' → ' + response.status + ' ' + await response.text();
    } catch (error) {
      result.dataset.status = '0';
      result.dataset.ok = 'false';
      result.textContent = now() + ' /' + path + ' failed: ' + error.message;
    }
    if (watchTimer !== null) poll();
  }

  $('watch').addEventListener('click', startWatching);
  $('unwatch').addEventListener('click', () => stopWatching('idle', 'not watching'));
  $('lookup').addEventListener('click', () => operate('GET', 'presence'));
  $('cut-off').addEventListener('click', () => operate('POST', 'disconnect'));

  $('connect').addEventListener('click', () => {
    wanted = true;
    attempt = 0;
    open();
  });
  $('disconnect').addEventListener('click', () => {
    wanted = false;
    clearTimers();
    if (socket) {
      socket.close(1000);
    } else {
      setState('closed', 'disconnected');
    }
  });
  $('publish').addEventListener('click', () => send('publish'));
  $('broadcast').addEventListener('click', () => send('broadcast'));
  $('clear').addEventListener('click', () => {
    $('events').replaceChildren();
    received = 0;
    $('event-count').textContent = '0';
  });
  setState('idle', 'paste a player token and connect');
  setRecovery('none', 'not connected yet');
})();
