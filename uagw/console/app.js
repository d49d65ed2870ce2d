/*
 * ua-gateway ops console: plain JavaScript (ES2017), no framework, no build step, nothing fetched from
 * elsewhere. The page's Content-Security-Policy forbids inline script and style, so every handler is
 * attached here and every look comes from style.css classes.
 *
 * Rules this file keeps
 * - The token lives in sessionStorage only (this tab), never in localStorage or a URL. HTTP requests send
 *   it as "Authorization: Bearer"; WebSockets, which cannot carry headers from a browser, offer it as the
 *   subprotocol "bearer.<base64url(token)>" next to "ua.v1" (PROTOCOL.md §4). Any 401 brings the token
 *   prompt back, and nothing more is sent until one is typed; a token not yet accepted (no token
 *   included) is tested by one request before the others are sent.
 * - Log tails follow the server's cursor, passed back verbatim: no line is skipped or shown twice, and a
 *   reset or truncation is shown, never silently papered over (PROTOCOL.md §5.11).
 * - Text from the server is always inserted with textContent, never as HTML.
 * - Live views stream (PROTOCOL.md §13): fetch() with response.body.getReader(), since EventSource cannot
 *   send the Authorization header. A dropped stream reconnects with Last-Event-ID after a bounded backoff;
 *   where streaming is unavailable (no ReadableStream, or an answer that is not text/event-stream) the
 *   console polls as it always did.
 *
 * Sections: utilities, the HTTP client and token, the sessions list, the session view, log tails,
 * dialogs (reset, compact, delete), the agent pane, start-up.
 */
'use strict';

(function () {
  const TOKEN_KEY = 'ua-gateway.token';
  const LIST_REFRESH_MS = 5000;     // the sessions list and the open session's details
  const HEALTH_REFRESH_MS = 10000;
  const TAIL_POLL_MS = 1000;        // when a tail is caught up; while `more` is true it asks again at once
  const TAIL_RETRY_MS = 3000;       // after a failed poll
  const TAIL_MAX_LINES = 5000;      // lines kept on screen per tail; older ones are dropped from the page
  const MAX_FRAMES = 500;           // agent frames kept on screen
  const STREAM_BACKOFF_MS = [500, 1000, 2000, 4000, 8000]; // before each reconnect in a row; the last repeats
  const MAX_SSE_BUFFER = 8 * 1024 * 1024; // an event is one slice of at most 1 MiB of log, JSON-escaped
  // Streaming needs fetch's ReadableStream body; a browser without it (or a page that removed it) polls.
  const CAN_STREAM = typeof ReadableStream === 'function' && typeof TextDecoder === 'function' &&
    typeof AbortController === 'function' && typeof Response === 'function' && 'body' in Response.prototype;

  const $ = (selector, root) => (root || document).querySelector(selector);

  // -------------------------------------------------------------------------------------------------
  // Utilities
  // -------------------------------------------------------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function formatBytes(count) {
    if (count < 1024) return count + ' B';
    if (count < 1024 * 1024) return (count / 1024).toFixed(1) + ' KiB';
    return (count / (1024 * 1024)).toFixed(1) + ' MiB';
  }

  function formatTime(iso) {
    if (!iso) return '–';
    return iso.replace('T', ' ').replace('+00:00', ' UTC');
  }

  function timeAgo(iso) {
    if (!iso) return '–';
    const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
    if (!isFinite(seconds)) return iso;
    if (seconds < 5) return 'just now';
    if (seconds < 60) return seconds + ' s ago';
    if (seconds < 3600) return Math.floor(seconds / 60) + ' min ago';
    if (seconds < 86400) return Math.floor(seconds / 3600) + ' h ago';
    return Math.floor(seconds / 86400) + ' d ago';
  }

  function clockTime(iso) {
    const date = iso ? new Date(iso) : new Date();
    return isNaN(date.getTime()) ? '' : date.toTimeString().slice(0, 8);
  }

  function base64url(text) {
    const bytes = new TextEncoder().encode(text);
    let binary = '';
    bytes.forEach((byte) => { binary += String.fromCharCode(byte); });
    return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  }

  let toastTimer = null;
  function toast(text) {
    const box = $('#toast');
    box.textContent = text;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  function showBanner(text) {
    $('#banner-text').textContent = text;
    $('#banner').hidden = false;
  }

  function hideBanner() {
    $('#banner').hidden = true;
  }

  // -------------------------------------------------------------------------------------------------
  // The HTTP client and the token
  // -------------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail, retryAfter) {
      super(detail);
      this.status = status;
      this.detail = detail;
      this.retryAfter = retryAfter;
    }
  }

  // After a 401 the console sends nothing more until a token is typed: every refused request that offers
  // a token counts toward the gateway's lockout (10 failures in 60 s lock this address out for 5 minutes).
  let waitingForToken = false;
  // Until the gateway has answered a request with the current token (or with none) by anything but 401,
  // requests go one at a time: a page load on a gateway with a token makes one 401 and the prompt, not
  // a burst of parallel 401s (a wrong token in each would count toward the lockout).
  let acceptedToken = null;
  let firstAnswer = null; // settles when the request testing the current token has its answer

  /** Wait for the right to send a request: rejects (and brings the prompt back) while waiting for a
   * token; resolves with a function taking the answer's status when this request tests the token. */
  async function mayRequest() {
    for (;;) {
      if (waitingForToken) {
        if (!$('#token-dialog').open) askForToken();
        throw new ApiError(401, 'waiting for the token');
      }
      if (getToken() === acceptedToken) return null;
      if (!firstAnswer) break;
      await firstAnswer;
    }
    let settle;
    firstAnswer = new Promise((resolve) => { settle = resolve; });
    const token = getToken();
    return (status) => {
      if (status && status !== 401) acceptedToken = token;
      firstAnswer = null;
      settle();
    };
  }

  /** fetch() through the token gate above: one request tests a new token before the others go. The
   * token is added here, after the wait, so a request sends the token the gate judged. */
  async function fetchGated(url, init) {
    const answered = await mayRequest();
    const token = getToken();
    if (token) init.headers.Authorization = 'Bearer ' + token;
    let status = 0;
    try {
      const response = await fetch(url, init);
      status = response.status;
      if (status === 401) {
        waitingForToken = true;
        askForToken(token ? 'The gateway refused this token. Type the right one.' : 'This gateway needs its token (UA_OPS_TOKEN).');
      }
      return response;
    } catch (error) {
      throw new ApiError(0, 'cannot reach the gateway (' + error.message + ')');
    } finally {
      if (answered) answered(status);
    }
  }

  function getToken() {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  }

  function setToken(token) {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $('#token-button').textContent = token ? 'Token: set' : 'Token: not set';
  }

  /** Call the gateway. Resolves with the JSON answer; rejects with ApiError (401s also open the prompt). */
  async function api(method, path, options) {
    const opts = options || {};
    let url = path;
    if (opts.query) {
      const parts = Object.keys(opts.query)
        .filter((name) => opts.query[name] !== undefined && opts.query[name] !== null && opts.query[name] !== '')
        .map((name) => encodeURIComponent(name) + '=' + encodeURIComponent(String(opts.query[name])));
      if (parts.length) url += '?' + parts.join('&');
    }
    const headers = { Accept: 'application/json' };
    let body;
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }
    const response = await fetchGated(url, { method: method, headers: headers, body: body, cache: 'no-store', credentials: 'omit' });
    let payload = null;
    try {
      payload = await response.json();
    } catch (error) {
      payload = null;
    }
    if (response.ok) return payload;
    const detail = payload && typeof payload.detail === 'string' ? payload.detail : response.status + ' ' + response.statusText;
    return Promise.reject(new ApiError(response.status, detail, response.headers.get('Retry-After')));
  }

  /** The text an operator sees for a failed call. */
  function describeError(error) {
    if (!(error instanceof ApiError)) return String(error && error.message ? error.message : error);
    if (error.status === 401) return 'Unauthorized: set the gateway token (button at the top right).';
    if (error.status === 429) {
      const wait = error.retryAfter ? ' Retry after ' + error.retryAfter + ' s.' : '';
      return 'Too many failed authentications from this address.' + wait + ' (' + error.detail + ')';
    }
    return (error.status ? error.status + ': ' : '') + error.detail;
  }

  function reportError(error) {
    if (error instanceof ApiError && error.status === 401) return; // the token prompt says it
    showBanner(describeError(error));
  }

  /** Open an SSE stream (PROTOCOL.md §13). Resolves with the response when it is one; rejects with
   * ApiError for an error status (a 401 also opens the prompt) and with StreamUnavailable otherwise. */
  async function openStream(path, query, lastId, signal) {
    const parts = Object.keys(query).filter((name) => query[name] !== undefined && query[name] !== null && query[name] !== '')
      .map((name) => encodeURIComponent(name) + '=' + encodeURIComponent(String(query[name])));
    const headers = { Accept: 'text/event-stream' };
    if (lastId) headers['Last-Event-ID'] = lastId;
    const response = await fetchGated(path + (parts.length ? '?' + parts.join('&') : ''),
      { headers: headers, cache: 'no-store', credentials: 'omit', signal: signal });
    const type = response.headers.get('Content-Type') || '';
    if (response.status === 200 && type.indexOf('text/event-stream') === 0 && response.body) return response;
    if (response.status === 200) {
      response.body && response.body.cancel();
      throw new StreamUnavailable('the answer is ' + (type || 'untyped') + ', not an event stream');
    }
    let payload = null;
    try { payload = await response.json(); } catch (error) { payload = null; }
    const detail = payload && typeof payload.detail === 'string' ? payload.detail : response.status + ' ' + response.statusText;
    throw new ApiError(response.status, detail, response.headers.get('Retry-After'));
  }

  class StreamUnavailable extends Error {}

  /** Read SSE events from a streaming response until it ends: onEvent(name, id, data) for each event,
   * comments skipped. Resolves when the stream ends; rejects when it breaks off or is aborted. */
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const chunk = await reader.read();
      if (chunk.done) return;
      buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, '\n');
      if (buffer.length > MAX_SSE_BUFFER) {
        reader.cancel();
        throw new Error('an event is over ' + MAX_SSE_BUFFER + ' characters: not the gateway\'s stream');
      }
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const fields = {};
        block.split('\n').forEach((line) => {
          if (!line || line[0] === ':') return; // a keep-alive comment
          const colon = line.indexOf(':');
          const name = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? '' : line.slice(colon + 1);
          if (value[0] === ' ') value = value.slice(1);
          fields[name] = value;
        });
        if (!('event' in fields) && !('data' in fields)) continue;
        let data = null;
        try { data = JSON.parse(fields.data || 'null'); } catch (error) { data = null; }
        onEvent(fields.event || 'message', 'id' in fields ? fields.id : null, data);
      }
    }
  }

  function backoff(failures) {
    return STREAM_BACKOFF_MS[Math.min(failures, STREAM_BACKOFF_MS.length) - 1] || 0;
  }

  function askForToken(reason) {
    const dialog = $('#token-dialog');
    $('#token-reason').textContent = reason || 'The Ops API needs the gateway\'s token (UA_OPS_TOKEN) when one is set.';
    if (dialog.open) return; // several requests can fail at once; keep what the operator is typing
    $('#token-input').value = '';
    dialog.showModal();
    $('#token-input').focus();
  }

  function setUpTokenDialog() {
    const dialog = $('#token-dialog');
    $('#token-button').addEventListener('click', () => askForToken());
    $('#token-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const token = $('#token-input').value.trim();
      if (!token) return;
      setToken(token);
      waitingForToken = false;
      dialog.close();
      hideBanner();
      refreshAll();
    });
    $('#token-clear').addEventListener('click', () => {
      setToken('');
      dialog.close();
    });
    $('#token-cancel').addEventListener('click', () => dialog.close());
  }

  // -------------------------------------------------------------------------------------------------
  // Health
  // -------------------------------------------------------------------------------------------------

  async function refreshHealth() {
    const badge = $('#health');
    try {
      const response = await fetch('/api/v1/health', { cache: 'no-store', credentials: 'omit' });
      const health = await response.json();
      badge.className = 'health ' + (response.ok ? 'health-ok' : 'health-bad');
      badge.textContent = response.ok ? 'ok · v' + health.version : 'degraded';
      badge.title = response.ok ? 'up ' + Math.round(health.uptime_s) + ' s' : health.detail;
    } catch (error) {
      badge.className = 'health health-bad';
      badge.textContent = 'unreachable';
      badge.title = String(error);
    }
  }

  // -------------------------------------------------------------------------------------------------
  // The sessions list
  // -------------------------------------------------------------------------------------------------

  const list = { status: 'all', offset: 0, limit: 50, total: 0, sessions: [], search: '' };
  let selectedId = null;

  async function refreshSessions() {
    try {
      const page = await api('GET', '/api/v1/ops/sessions', { query: { status: list.status, limit: list.limit, offset: list.offset } });
      if (page.total > 0 && page.offset >= page.total) {
        list.offset = Math.max(0, Math.floor((page.total - 1) / list.limit) * list.limit);
        return refreshSessions();
      }
      list.sessions = page.sessions;
      list.total = page.total;
      renderSessions();
    } catch (error) {
      reportError(error);
    }
  }

  function statusBadge(session) {
    const badge = element('span', 'badge badge-' + session.status, session.status);
    if (session.running) badge.textContent += ' · turn';
    else if (session.active_connections) badge.textContent += ' · ' + session.active_connections;
    badge.title = session.active_connections + ' connection(s)' + (session.running ? ', a turn is running' : '');
    return badge;
  }

  function renderSessions() {
    const tbody = $('#sessions-table tbody');
    const needle = list.search.toLowerCase();
    const shown = list.sessions.filter((s) => !needle || s.session_id.toLowerCase().indexOf(needle) >= 0);
    tbody.textContent = '';
    shown.forEach((session) => tbody.appendChild(sessionRow(session)));
    $('#sessions-empty').hidden = shown.length > 0;
    $('#sessions-empty').textContent = list.sessions.length ? 'No session on this page matches "' + list.search + '" (Enter opens it by id).' : 'No sessions.';
    $('#sessions-total').textContent = list.total ? '(' + list.total + ')' : '';
    const first = list.sessions.length ? list.offset + 1 : 0;
    $('#page-info').textContent = first + '–' + (list.offset + list.sessions.length) + ' of ' + list.total;
    $('#page-prev').disabled = list.offset === 0;
    $('#page-next').disabled = list.offset + list.sessions.length >= list.total;
  }

  function sessionRow(session) {
    const row = element('tr', session.session_id === selectedId ? 'selected' : '');
    row.dataset.sessionId = session.session_id;
    row.tabIndex = 0;
    const id = element('td');
    const name = element('span', 'mono session-id', session.session_id);
    name.title = session.session_id;
    id.appendChild(name);
    row.appendChild(id);
    const status = element('td');
    status.appendChild(statusBadge(session));
    row.appendChild(status);
    const activity = element('td', 'nowrap', timeAgo(session.last_activity));
    activity.title = formatTime(session.last_activity);
    row.appendChild(activity);
    const logs = element('td', 'nowrap');
    logs.appendChild(element('span', 'tag' + (session.has_run_log ? '' : ' tag-off'), 'run'));
    logs.appendChild(element('span', 'tag' + (session.has_activity_journal ? '' : ' tag-off'), 'journal'));
    row.appendChild(logs);
    const heartbeat = element('td', 'nowrap', timeAgo(session.heartbeat_last_at));
    heartbeat.title = formatTime(session.heartbeat_last_at);
    row.appendChild(heartbeat);
    return row;
  }

  // The session events stream (PROTOCOL.md §13.3) keeps the table current without listing again: a
  // change is applied to the row it names; a `reset` event (changes were missed) lists once.
  const events = { live: false, open: false, lastId: null, failures: 0 };
  const TURN_KINDS = { turn_started: true, turn_finished: true, connections: true };

  async function followEvents() {
    if (!CAN_STREAM || waitingForToken || events.open) return;
    events.open = true; // one stream (and one reconnect timer) at a time
    try {
      const response = await openStream('/api/v1/ops/events', {}, events.lastId, undefined);
      events.live = true;
      await readEvents(response, (name, id, data) => {
        events.failures = 0;
        if (id) events.lastId = id;
        applySessionEvent(name, data || {});
      });
    } catch (error) {
      events.live = false;
      if (error instanceof StreamUnavailable || (error instanceof ApiError && error.status === 401)) {
        events.open = false; // the list keeps refreshing on its timer; a new token starts the stream again
        return;
      }
    }
    events.live = false; // the timer lists again meanwhile
    events.failures += 1;
    setTimeout(() => { events.open = false; followEvents(); }, backoff(events.failures));
  }

  function applySessionEvent(name, data) {
    if (!data.session_id) {
      if (name === 'reset') refreshSessions(); // changes were missed: list once
      return;
    }
    const index = list.sessions.findIndex((s) => s.session_id === data.session_id);
    const at = typeof data.at === 'number' ? new Date(data.at * 1000).toISOString() : null;
    if (name === 'created') {
      if (index >= 0 || list.offset !== 0 || (list.status !== 'all' && list.status !== 'active')) return;
      list.sessions.unshift({ session_id: data.session_id, status: 'active', running: false, active_connections: 0,
        last_activity: at, has_run_log: false, has_activity_journal: false, heartbeat_last_at: null });
      if (list.sessions.length > list.limit) list.sessions.pop();
      list.total += 1;
    } else if (name === 'deleted') {
      if (index < 0) return;
      list.sessions.splice(index, 1);
      list.total = Math.max(0, list.total - 1);
    } else if (index < 0) {
      return;
    } else if (TURN_KINDS[name]) {
      const session = list.sessions[index];
      if (name === 'connections') session.active_connections = data.connections;
      if (name === 'turn_started') { session.running = true; session.status = 'running'; }
      if (name === 'turn_finished') { session.running = false; session.status = 'active'; }
      if (at) session.last_activity = at;
    } else {
      refreshRow(data.session_id); // reset, archived, compacted, updated: this one session's new state
      return;
    }
    renderSessions();
    if (data.session_id === selectedId && name !== 'connections') refreshDetails();
  }

  async function refreshRow(sessionId) {
    try {
      const details = await api('GET', sessionPath(sessionId));
      const index = list.sessions.findIndex((s) => s.session_id === sessionId);
      if (index >= 0 && details && details.session) {
        list.sessions[index] = Object.assign({}, list.sessions[index], details.session);
        renderSessions();
      }
      if (sessionId === selectedId) renderDetails(details);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) reportError(error);
    }
  }

  function setUpSessionsList() {
    $('#sessions-table tbody').addEventListener('click', (event) => {
      const row = event.target.closest('tr[data-session-id]');
      if (row) openSession(row.dataset.sessionId);
    });
    $('#sessions-table tbody').addEventListener('keydown', (event) => {
      const row = event.target.closest('tr[data-session-id]');
      if (row && event.key === 'Enter') openSession(row.dataset.sessionId);
    });
    $('#status-filter').addEventListener('change', (event) => {
      list.status = event.target.value;
      list.offset = 0;
      refreshSessions();
    });
    $('#session-search').addEventListener('input', (event) => {
      list.search = event.target.value.trim();
      renderSessions();
    });
    $('#session-search').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && list.search) openSession(list.search);
    });
    $('#page-size').addEventListener('change', (event) => {
      list.limit = parseInt(event.target.value, 10);
      list.offset = 0;
      refreshSessions();
    });
    $('#page-prev').addEventListener('click', () => {
      list.offset = Math.max(0, list.offset - list.limit);
      refreshSessions();
    });
    $('#page-next').addEventListener('click', () => {
      list.offset += list.limit;
      refreshSessions();
    });
    $('#sessions-refresh').addEventListener('click', refreshAll);
    $('#banner-close').addEventListener('click', hideBanner);
  }

  // -------------------------------------------------------------------------------------------------
  // The session view
  // -------------------------------------------------------------------------------------------------

  let tails = [];

  function sessionPath(sessionId) {
    return '/api/v1/ops/sessions/' + encodeURIComponent(sessionId);
  }

  function openSession(sessionId) {
    if (sessionId !== selectedId) {
      tails.forEach((tail) => tail.stop());
      selectedId = sessionId;
      $('#session-title').textContent = sessionId;
      $('#session-status').textContent = '';
      $('#session-placeholder').hidden = true;
      $('#session-view').hidden = false;
      tails = [
        new LogTail($('#journal-tail'), sessionPath(sessionId) + '/preview', {}),
        liveRunLogTail(sessionId),
      ];
      $('#runlog-title').textContent = 'run.log';
      $('#runlog-live').hidden = true;
      tails.forEach((tail) => tail.start());
      renderSessions();
      updateAgentButtons();
    }
    return refreshDetails();
  }

  function liveRunLogTail(sessionId) {
    return new LogTail($('#runlog-tail'), '/api/v1/ops/logs/tail', { session_id: sessionId, file: 'run.log' });
  }

  // PROTOCOL.md §16.3: an archived log, plain or compressed, read in the run.log pane with the same cursors.
  function openArchivedLog(stamp, name) {
    if (!selectedId) return;
    tails[1].stop();
    const path = sessionPath(selectedId) + '/archives/' + encodeURIComponent(stamp) + '/' + encodeURIComponent(name);
    tails[1] = new LogTail($('#runlog-tail'), path, {});
    tails[1].start();
    $('#runlog-title').textContent = 'archive/' + stamp + '/' + name;
    $('#runlog-live').hidden = false;
  }

  function showLiveRunLog() {
    if (!selectedId) return;
    tails[1].stop();
    tails[1] = liveRunLogTail(selectedId);
    tails[1].start();
    $('#runlog-title').textContent = 'run.log';
    $('#runlog-live').hidden = true;
  }

  async function refreshArchives(sessionId) {
    let listing;
    try {
      listing = await api('GET', sessionPath(sessionId) + '/archives');
    } catch (error) {
      if (sessionId === selectedId) reportError(error);
      return;
    }
    if (sessionId !== selectedId) return;
    renderArchives(listing);
  }

  function renderArchives(listing) {
    const table = $('#archive-files');
    const tbody = $('tbody', table);
    tbody.textContent = '';
    listing.archives.slice().reverse().forEach((archive) => {
      archive.files.filter((file) => file.kind === 'log').forEach((file) => {
        const row = element('tr');
        const when = element('td', 'mono nowrap', archive.stamp);
        when.title = formatTime(archive.created);
        row.appendChild(when);
        row.appendChild(element('td', 'mono', file.name + (file.compressed ? ' (gzip)' : '')));
        row.appendChild(element('td', 'num', file.bytes === null ? '?' : formatBytes(file.bytes)));
        row.appendChild(element('td', 'num', formatBytes(file.disk_bytes)));
        const open = element('button', 'button button-small', 'Open');
        open.type = 'button';
        open.addEventListener('click', () => openArchivedLog(archive.stamp, file.name));
        const cell = element('td');
        cell.appendChild(open);
        row.appendChild(cell);
        tbody.appendChild(row);
      });
    });
    table.hidden = !tbody.firstChild;
  }

  function closeSession() {
    tails.forEach((tail) => tail.stop());
    tails = [];
    selectedId = null;
    $('#session-view').hidden = true;
    $('#session-placeholder').hidden = false;
    renderSessions();
    updateAgentButtons();
  }

  async function refreshDetails() {
    const sessionId = selectedId;
    if (!sessionId) return;
    try {
      const details = await api('GET', sessionPath(sessionId));
      if (sessionId === selectedId) renderDetails(details);
      if (sessionId === selectedId && details.archives_total) await refreshArchives(sessionId);
      else if (sessionId === selectedId) renderArchives({ archives: [] });
    } catch (error) {
      if (sessionId !== selectedId) return;
      if (error instanceof ApiError && error.status === 404) {
        closeSession();
        showBanner('Session ' + sessionId + ' does not exist (any more).');
      } else if (error instanceof ApiError && error.status === 400) {
        closeSession();
        showBanner(describeError(error));
      } else {
        reportError(error);
      }
    }
  }

  function describeMemory(memory) {
    if (!memory.has_memory_md && !memory.files) return 'none';
    const parts = memory.has_memory_md ? ['MEMORY.md'] : [];
    if (memory.files) parts.push(memory.files + (memory.files === 1 ? ' file' : ' files') + ' in memory/');
    return parts.join(' + ') + ' · ' + formatBytes(memory.bytes);
  }

  function renderDetails(details) {
    const session = details.session;
    const badge = $('#session-status');
    badge.className = 'badge badge-' + session.status;
    badge.textContent = session.status + (session.running ? ' · turn running' : '');
    const facts = $('#session-facts');
    facts.textContent = '';
    const heartbeat = session.heartbeat && session.heartbeat.last_turn;
    [
      ['Description', session.description || '–'],
      ['Owner', (session.owner || 'unknown') + ' · ' + (session.source || 'local') + ' · memory ' + (session.memory_mode || 'direct_only')],
      ['Rehydrate', session.rehydrate_reason ? (session.rehydrate_ready ? 'ready: ' : 'not ready: ') + session.rehydrate_reason : '–'],
      ['Last activity', formatTime(session.last_activity) + ' (' + timeAgo(session.last_activity) + ')'],
      ['Last modified', formatTime(session.last_modified)],
      ['Heartbeat', session.heartbeat_last_at ? formatTime(session.heartbeat_last_at) + ' (' + timeAgo(session.heartbeat_last_at) + ')' : '–'],
      ['Last turn', heartbeat ? (heartbeat.completed ? 'completed' : heartbeat.cancelled ? 'cancelled' : 'not completed') + ', ' + heartbeat.events + ' events' : '–'],
      ['Connections', session.active_connections + (session.running ? ', a turn is running' : '')],
      ['Memory', describeMemory(details.memory)],
    ].forEach((fact) => {
      facts.appendChild(element('dt', '', fact[0]));
      facts.appendChild(element('dd', '', fact[1]));
    });
    const tbody = $('#session-files tbody');
    tbody.textContent = '';
    details.files.forEach((file) => {
      const row = element('tr');
      row.appendChild(element('td', 'mono', file.name));
      row.appendChild(element('td', 'num', formatBytes(file.size)));
      const modified = element('td', 'nowrap', timeAgo(file.modified));
      modified.title = formatTime(file.modified);
      row.appendChild(modified);
      tbody.appendChild(row);
    });
    if (!details.files.length) {
      const row = element('tr');
      const cell = element('td', 'muted', 'empty directory');
      cell.colSpan = 3;
      row.appendChild(cell);
      tbody.appendChild(row);
    }
    const disk = details.disk_bytes;
    $('#session-archives').textContent = (details.archives_total ? details.archives_total + ' · ' : 'none · ') +
      (disk ? formatBytes(disk.archived) + ' on disk; live files ' + formatBytes(disk.live) : '');
  }

  // -------------------------------------------------------------------------------------------------
  // Log tails: follow a log slice by slice, with the cursor passed back verbatim
  // -------------------------------------------------------------------------------------------------

  class LogTail {
    constructor(root, path, query) {
      this.root = root;
      this.path = path;
      this.query = query;
      this.cursor = null;       // null: the first read is a tail of the last lines
      this.timer = null;
      this.running = false;
      this.paused = false;
      this.busy = false;        // a poll is in flight; its reply schedules the next one
      this.generation = 0;      // bumps on stop, so a reply to an old poll is ignored
      this.streaming = CAN_STREAM; // false once the gateway answered a follow with something else: poll
      this.controller = null;   // aborts the open stream
      this.failures = 0;        // stream drops in a row, for the reconnect backoff
      this.pendingReset = false; // a reset event: the next lines restart the file
      this.file = root.dataset.file || '';
      this.ended = false;       // the session was deleted: nothing more to follow
      this.lines = $('.log-lines', root);
      this.notice = $('.tail-notice', root);
      this.state = $('.tail-state', root);
      this.autoscroll = $('.tail-autoscroll', root);
      this.pauseButton = $('.tail-pause', root);
      this.lines.textContent = '';
      this.hideNotice();
      this.setPaused(false);
      // Properties rather than addEventListener: the next session's tail reuses these buttons.
      this.pauseButton.onclick = () => this.setPaused(!this.paused);
      $('.tail-clear', root).onclick = () => { this.lines.textContent = ''; };
    }

    start() {
      this.running = true;
      this.schedule(0);
    }

    stop() {
      this.running = false;
      this.generation += 1;
      clearTimeout(this.timer);
      this.closeStream();
    }

    closeStream() {
      if (this.controller) this.controller.abort();
      this.controller = null;
      this.busy = false;
    }

    setPaused(paused) {
      this.paused = paused;
      this.pauseButton.textContent = paused ? 'Resume' : 'Pause';
      this.pauseButton.classList.toggle('button-active', paused);
      this.root.classList.toggle('paused', paused);
      if (paused) {
        clearTimeout(this.timer);
        this.generation += 1;
        this.closeStream(); // resuming reconnects from the cursor: nothing is missed meanwhile
        this.state.textContent = 'paused';
      } else if (this.running) {
        this.schedule(0);
      }
    }

    schedule(delay) {
      clearTimeout(this.timer);
      if (this.running && !this.paused && !this.busy) {
        this.timer = setTimeout(() => (this.streaming ? this.follow() : this.poll()), delay);
      }
    }

    /** Follow by streaming (PROTOCOL.md §13.2): the slice, then each batch of lines as it is written.
     * While a stream is open, busy stays true, so refreshes do not start a poll beside it. */
    async follow() {
      const generation = this.generation;
      const controller = new AbortController();
      this.controller = controller;
      this.busy = true;
      const query = Object.assign({}, this.query, { follow: 'true' });
      try {
        const response = await openStream(this.path, query, this.cursor, controller.signal);
        if (generation !== this.generation) return;
        this.state.textContent = 'streaming';
        await readEvents(response, (name, id, data) => {
          if (generation === this.generation) this.onEvent(name, id, data);
        });
        throw new Error('the stream ended');
      } catch (error) {
        if (generation !== this.generation) return; // stopped or paused: aborted on purpose
        this.controller = null;
        this.busy = false;
        if (error instanceof StreamUnavailable) {
          this.streaming = false; // this gateway (or a proxy) does not stream: poll from the same cursor
          this.schedule(0);
          return;
        }
        if (error instanceof ApiError && error.status === 401) {
          this.showNotice(describeError(error), 'error');
          this.state.textContent = 'waiting for the token';
          return;
        }
        if (this.ended) return;
        if (error instanceof ApiError && error.status >= 400 && error.status !== 429 && error.status !== 503) {
          this.streaming = false; // refused as a stream (404, 400...): polling shows the same error and retries
          this.schedule(0);
          return;
        }
        this.failures += 1;
        const delay = backoff(this.failures);
        this.state.textContent = 'reconnecting in ' + Math.round(delay / 100) / 10 + ' s';
        this.schedule(delay);
      }
    }

    onEvent(name, id, data) {
      this.failures = 0;
      if (name === 'slice') {
        this.file = data.file;
        this.show(data);
      } else if (name === 'lines') {
        this.show({ file: this.file, lines: data.lines, truncated: data.truncated && this.cursor !== null,
          reset: this.pendingReset, more: false, cursor: id });
        this.pendingReset = false;
      } else if (name === 'reset') {
        this.pendingReset = true;
      } else if (name === 'resume') {
        this.cursor = id; // this page read slowly; the gateway reads on from here: nothing is lost
      } else if (name === 'end') {
        const reason = data && data.reason ? data.reason : 'the stream ended';
        this.showNotice('Stopped following: ' + reason + '.', 'info');
        this.ended = /deleted/.test(reason); // a deleted session has nothing more to follow
        this.state.textContent = 'ended';
      }
    }

    async poll() {
      const generation = this.generation;
      const query = Object.assign({}, this.query, { cursor: this.cursor });
      let piece;
      this.busy = true;
      try {
        piece = await api('GET', this.path, { query: query });
      } catch (error) {
        this.busy = false;
        if (generation !== this.generation) return;
        this.showNotice(describeError(error), 'error');
        // A 401 waits for the token; anything else is retried.
        if (!(error instanceof ApiError && error.status === 401)) this.schedule(TAIL_RETRY_MS);
        else this.state.textContent = 'waiting for the token';
        return;
      }
      this.busy = false;
      if (generation !== this.generation || this.paused) return; // resuming asks again from the same cursor
      this.show(piece);
      this.schedule(piece.more ? 0 : TAIL_POLL_MS);
    }

    show(piece) {
      const first = this.cursor === null;
      this.cursor = piece.cursor;
      if (piece.reset) {
        this.showNotice('Log was replaced/truncated; reading from the start.', 'warn');
        this.lines.appendChild(element('span', 'log-marker', '── ' + piece.file + ' replaced or truncated at ' + clockTime() + '; reading from the start ──\n'));
      } else if (piece.truncated && first) {
        this.showNotice('Older lines are not shown: this is the tail of ' + piece.file + '.', 'info');
      } else if (piece.truncated) {
        this.showNotice('A line longer than the slice limit was cut.', 'info');
      } else if (this.notice.classList.contains('notice-error')) {
        this.hideNotice();
      }
      if (piece.lines.length) {
        this.lines.appendChild(document.createTextNode(piece.lines.join('\n') + '\n'));
        this.trim();
        if (this.autoscroll.checked) this.lines.scrollTop = this.lines.scrollHeight;
      }
      const how = this.busy && this.streaming ? 'streaming' : piece.more ? 'catching up' : 'polling every ' + TAIL_POLL_MS / 1000 + ' s';
      this.state.textContent = piece.size === undefined ? how : how + ' · ' + formatBytes(piece.size);
    }

    trim() {
      // Text nodes hold whole slices; drop the oldest ones while the page holds too many lines.
      let total = this.lines.textContent.split('\n').length;
      while (total > TAIL_MAX_LINES && this.lines.firstChild) {
        total -= this.lines.firstChild.textContent.split('\n').length - 1;
        this.lines.removeChild(this.lines.firstChild);
      }
    }

    showNotice(text, kind) {
      this.notice.textContent = text;
      this.notice.className = 'tail-notice notice-' + kind;
      this.notice.hidden = false;
    }

    hideNotice() {
      this.notice.hidden = true;
      this.notice.className = 'tail-notice';
    }
  }

  // -------------------------------------------------------------------------------------------------
  // Dialogs: reset, compact and delete, each confirmed before anything is sent
  // -------------------------------------------------------------------------------------------------

  function openDialog(dialog) {
    $('.dialog-session', dialog).textContent = selectedId;
    const error = $('.dialog-error', dialog);
    error.hidden = true;
    error.textContent = '';
    dialog.showModal();
  }

  function dialogFailed(dialog, error) {
    const box = $('.dialog-error', dialog);
    box.textContent = describeError(error);
    box.hidden = false;
  }

  /** Run `action` from a dialog's form: close on success, keep it open with the error otherwise. */
  function onConfirm(dialog, action) {
    $('form', dialog).addEventListener('submit', async (event) => {
      event.preventDefault();
      const submit = $('button[type=submit]', dialog);
      submit.disabled = true;
      try {
        await action();
        dialog.close();
      } catch (error) {
        dialogFailed(dialog, error);
      } finally {
        submit.disabled = false;
        updateDeleteButton();
      }
    });
    $('.dialog-cancel', dialog).addEventListener('click', () => dialog.close());
  }

  function updateDeleteButton() {
    $('#delete-confirm').disabled = $('#delete-confirm-id').value !== selectedId;
  }

  function setUpDialogs() {
    const resetDialog = $('#reset-dialog');
    const compactDialog = $('#compact-dialog');
    const deleteDialog = $('#delete-dialog');

    $('#action-reset').addEventListener('click', () => openDialog(resetDialog));
    onConfirm(resetDialog, async () => {
      const result = await api('POST', sessionPath(selectedId) + '/reset', {
        body: {
          clear_logs: $('#reset-logs').checked,
          clear_memory: $('#reset-memory').checked,
          clear_work_products: $('#reset-work-products').checked,
        },
      });
      toast(result.archived.length ? 'Moved ' + result.archived.join(', ') + ' to ' + (result.archive_path || result.archive_dir) : 'Nothing to archive.');
      refreshAll();
    });

    $('#action-compact').addEventListener('click', () => { $('#compact-discard').checked = false; openDialog(compactDialog); });
    $('#runlog-live').addEventListener('click', showLiveRunLog);
    onConfirm(compactDialog, async () => {
      const result = await api('POST', sessionPath(selectedId) + '/compact', {
        body: {
          max_lines: parseInt($('#compact-max-lines').value, 10),
          max_bytes: parseInt($('#compact-max-bytes').value, 10),
          archive: !$('#compact-discard').checked,
        },
      });
      const kept = Object.keys(result.files).map((name) => name + ' keeps ' + result.files[name] + ' lines');
      toast('Compacted: ' + (kept.join(', ') || 'no live logs') + '; ' + formatBytes(result.bytes_dropped) + ' dropped, ' +
        formatBytes(result.bytes_archived) + ' archived, ' + formatBytes(result.bytes_freed) + ' freed.');
      refreshAll();
    });

    $('#action-delete').addEventListener('click', () => {
      $('#delete-confirm-id').value = '';
      $('#delete-force').checked = false;
      $('#delete-force-row').hidden = true;
      updateDeleteButton();
      openDialog(deleteDialog);
      $('#delete-confirm-id').focus();
    });
    $('#delete-confirm-id').addEventListener('input', updateDeleteButton);
    onConfirm(deleteDialog, async () => {
      const sessionId = selectedId;
      try {
        await api('DELETE', sessionPath(sessionId), { query: { confirm: 'true', force: $('#delete-force').checked ? 'true' : null } });
      } catch (error) {
        if (error instanceof ApiError && error.status === 409) $('#delete-force-row').hidden = false;
        throw error;
      }
      closeSession();
      toast('Deleted ' + sessionId + '.');
      refreshSessions();
    });
  }

  // -------------------------------------------------------------------------------------------------
  // The agent pane: one WebSocket, turns, frames as they arrive
  // -------------------------------------------------------------------------------------------------

  const agent = { socket: null, sessionId: null, turnRunning: false, pendingInputId: null };

  const CLOSE_REASONS = {
    1000: 'closed',
    1001: 'the gateway is shutting down',
    1006: 'connection lost (or refused: check the token, the Origin and UA_OPS_ALLOW_FROM)',
    1008: 'policy violation',
    1009: 'message too big',
    1011: 'the gateway could not open the session',
    4000: 'invalid session id',
    4003: 'user not allowed (UA_ALLOWED_USERS)',
    4004: 'session not found or deleted',
  };

  function socketUrl(path) {
    return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + path;
  }

  function connectAgent(sessionId) {
    disconnectAgent();
    let path = sessionId ? '/api/v1/sessions/' + encodeURIComponent(sessionId) + '/stream' : '/ws/agent';
    const user = $('#agent-user').value.trim();
    if (user) path += '?user_id=' + encodeURIComponent(user);
    const token = getToken();
    const protocols = token ? ['bearer.' + base64url(token), 'ua.v1'] : ['ua.v1'];
    let socket;
    try {
      socket = new WebSocket(socketUrl(path), protocols);
    } catch (error) {
      showBanner('Cannot open a WebSocket: ' + error.message);
      return;
    }
    agent.socket = socket;
    agent.sessionId = sessionId || null;
    agent.turnRunning = false;
    $('#agent-frames').textContent = '';
    setAgentState('connecting', 'connecting…');
    $('#agent-target').textContent = sessionId ? 'Attaching to ' + sessionId + '…' : 'Lobby: the first turn creates a new session.';
    socket.onopen = () => {
      setAgentState(sessionId ? 'connecting' : 'active', sessionId ? 'attaching…' : 'lobby');
      updateAgentButtons();
      if (!sessionId) $('#agent-input').focus();
    };
    socket.onmessage = (event) => {
      if (socket === agent.socket) onFrame(event.data);
    };
    socket.onclose = (event) => {
      if (socket !== agent.socket) return;
      agent.socket = null;
      agent.turnRunning = false;
      const reason = event.reason || CLOSE_REASONS[event.code] || '';
      addFrame({ type: 'closed', data: { code: event.code, reason: reason }, timestamp: new Date().toISOString() });
      setAgentState('idle', 'disconnected');
      $('#agent-target').textContent = 'Disconnected (' + event.code + (reason ? ': ' + reason : '') + ').';
      hideInputRequired();
      updateAgentButtons();
    };
  }

  function disconnectAgent() {
    const socket = agent.socket;
    agent.socket = null;
    if (socket) socket.close(1000, 'operator disconnected');
    agent.turnRunning = false;
    setAgentState('idle', 'disconnected');
    if (socket) $('#agent-target').textContent = 'Disconnected.';
    hideInputRequired();
    updateAgentButtons();
  }

  function send(message) {
    if (agent.socket && agent.socket.readyState === WebSocket.OPEN) agent.socket.send(JSON.stringify(message));
  }

  function onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (error) {
      frame = { type: 'unparsed', data: { text: text } };
    }
    addFrame(frame);
    const data = frame.data || {};
    if (frame.type === 'connected') {
      const createdByLobby = !agent.sessionId;
      agent.sessionId = data.session_id;
      setAgentState('active', 'connected');
      $('#agent-target').textContent = 'Connected to ' + data.session_id + '.';
      refreshSessions();
      if (createdByLobby || !selectedId) openSession(data.session_id);
      else refreshDetails();
    } else if (frame.type === 'status' && data.status === 'processing') {
      agent.turnRunning = true;
    } else if (frame.type === 'input_required') {
      showInputRequired(data);
    } else if (frame.type === 'query_complete') {
      agent.turnRunning = false;
      hideInputRequired();
      setTimeout(refreshAll, 300); // the heartbeat is written just after the turn ends
    }
    updateAgentButtons();
  }

  function frameSummary(frame) {
    const data = frame.data || {};
    // connected carries Universal Agent's "message" too; the session it names is what matters here
    if (frame.type === 'connected' && typeof data.session_id === 'string') return data.session_id;
    for (const key of ['text', 'message', 'status', 'prompt', 'question', 'session_id']) {
      if (typeof data[key] === 'string') return data[key];
    }
    return JSON.stringify(data);
  }

  function addFrame(frame) {
    const frames = $('#agent-frames');
    const item = element('li', 'frame frame-' + String(frame.type).replace(/[^a-z_]/gi, ''));
    item.appendChild(element('time', 'frame-time', clockTime(frame.timestamp)));
    item.appendChild(element('span', 'frame-type', frame.type));
    item.appendChild(element('span', 'frame-data', frameSummary(frame)));
    item.title = JSON.stringify(frame.data);
    frames.appendChild(item);
    while (frames.childNodes.length > MAX_FRAMES) frames.removeChild(frames.firstChild);
    frames.scrollTop = frames.scrollHeight;
  }

  function showInputRequired(data) {
    agent.pendingInputId = typeof data.input_id === 'string' ? data.input_id : 'default';
    $('#agent-input-prompt').textContent = data.prompt || data.question || data.text || data.message || 'The agent asks for input.';
    $('#agent-input-required').hidden = false;
    $('#agent-input-response').value = '';
    $('#agent-input-response').focus();
  }

  function hideInputRequired() {
    agent.pendingInputId = null;
    $('#agent-input-required').hidden = true;
  }

  function setAgentState(kind, text) {
    const badge = $('#agent-state');
    badge.className = 'badge badge-' + kind;
    badge.textContent = text;
  }

  function updateAgentButtons() {
    const open = !!agent.socket && agent.socket.readyState === WebSocket.OPEN;
    $('#agent-attach').disabled = !selectedId;
    $('#agent-attach').title = selectedId ? 'Attach to ' + selectedId : 'Select a session first';
    $('#agent-disconnect').disabled = !agent.socket;
    $('#agent-input').disabled = !open;
    $('#agent-run').disabled = !open || agent.turnRunning;
    $('#agent-cancel').disabled = !open || !agent.turnRunning;
  }

  function runTurn() {
    const input = $('#agent-input');
    const text = input.value.trim();
    if (!text || !agent.socket) return;
    send({ type: 'execute', data: { user_input: text, client_turn_id: 'console-' + Date.now().toString(36) } });
    addFrame({ type: 'execute', data: { text: text }, timestamp: new Date().toISOString() });
    agent.turnRunning = true;
    input.value = '';
    updateAgentButtons();
  }

  function setUpAgentPane() {
    $('#agent-attach').addEventListener('click', () => { if (selectedId) connectAgent(selectedId); });
    $('#agent-new').addEventListener('click', () => connectAgent(null));
    $('#agent-disconnect').addEventListener('click', disconnectAgent);
    $('#agent-form').addEventListener('submit', (event) => {
      event.preventDefault();
      runTurn();
    });
    $('#agent-input').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        runTurn();
      }
    });
    $('#agent-cancel').addEventListener('click', () => send({ type: 'cancel', data: { reason: 'cancelled from the console' } }));
    $('#agent-input-required').addEventListener('submit', (event) => {
      event.preventDefault();
      const response = $('#agent-input-response').value;
      send({ type: 'input_response', data: { input_id: agent.pendingInputId, response: response } });
      addFrame({ type: 'input_response', data: { text: response }, timestamp: new Date().toISOString() });
      hideInputRequired();
    });
  }

  // -------------------------------------------------------------------------------------------------
  // Audit: the newest records of the audit trail, newest first
  // -------------------------------------------------------------------------------------------------

  function auditRow(line) {
    let record = null;
    try { record = JSON.parse(line); } catch (error) { record = null; }
    const row = element('tr');
    if (!record || typeof record !== 'object') {
      row.appendChild(element('td', 'muted', '?'));
      const cell = element('td', 'mono', line.slice(0, 120));
      cell.colSpan = 5;
      row.appendChild(cell);
      return row;
    }
    const outcome = record.outcome && typeof record.outcome === 'object' ? record.outcome : {};
    const when = element('td', 'nowrap', clockTime(record.time));
    when.title = formatTime(record.time);
    row.appendChild(when);
    const action = element('td', 'mono', String(record.action || ''));
    action.title = (record.method || '') + ' ' + (record.route || '');
    row.appendChild(action);
    row.appendChild(element('td', 'mono', record.session ? String(record.session) : '–'));
    row.appendChild(element('td', 'mono', record.client ? String(record.client) : '–'));
    row.appendChild(element('td', '', String(record.scope || '')));
    const status = outcome.status === null || outcome.status === undefined ? '–' : String(outcome.status);
    const failed = typeof outcome.status === 'number' && outcome.status >= 400;
    const text = status + (outcome.result ? ' ' + outcome.result : '') + (outcome.archive_dir ? ' → ' + outcome.archive_dir : '');
    row.appendChild(element('td', failed ? 'audit-outcome-failed' : '', text));
    return row;
  }

  async function refreshAudit() {
    try {
      const piece = await api('GET', '/api/v1/ops/audit', { query: { limit: $('#audit-limit').value } });
      const tbody = $('#audit-table tbody');
      tbody.textContent = '';
      piece.lines.slice().reverse().forEach((line) => tbody.appendChild(auditRow(line)));
      $('#audit-empty').hidden = piece.lines.length > 0;
      $('#audit-count').textContent = piece.lines.length ? '(' + piece.lines.length + (piece.truncated ? ' newest' : '') + ')' : '';
    } catch (error) {
      reportError(error);
    }
  }

  function setUpAudit() {
    $('#audit-refresh').addEventListener('click', refreshAudit);
    $('#audit-limit').addEventListener('change', refreshAudit);
  }

  // -------------------------------------------------------------------------------------------------
  // Start-up
  // -------------------------------------------------------------------------------------------------

  function refreshAll() {
    refreshSessions();
    followEvents();
    refreshAudit();
    refreshDetails();
    tails.forEach((tail) => { if (tail.running && !tail.paused) tail.schedule(0); });
  }

  function start() {
    setToken(getToken());
    setUpTokenDialog();
    setUpSessionsList();
    setUpDialogs();
    setUpAgentPane();
    setUpAudit();
    list.limit = parseInt($('#page-size').value, 10);
    refreshHealth();
    refreshSessions();
    refreshAudit();
    followEvents();
    setInterval(refreshHealth, HEALTH_REFRESH_MS);
    setInterval(() => {
      if ($('#sessions-auto').checked && !document.hidden && !waitingForToken) {
        if (!events.live) refreshSessions(); // while the events stream is open, it keeps the list current
        refreshDetails();
        refreshAudit();
      }
    }, LIST_REFRESH_MS);
  }

  start();
}());
