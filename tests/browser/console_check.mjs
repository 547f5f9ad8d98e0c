// Drives the gateway's /console page in Debian's headless Chromium, as a person would,
// for tests/test_console.py. Steps are reported as JSON lines on stdout; where the test
// must act on the gateway (close a socket, revoke a token) the script waits for a line
// on stdin before going on.
//
//   node console_check.mjs '{"url": "http://127.0.0.1:PORT", "playerToken": "...",
//                            "serverToken": "...", "playerId": "21", "screenshot": "path or null"}'
import { report, waitForLine, withPage } from './harness.mjs';

const options = JSON.parse(process.argv[2]);

// `requested`: every URL the page asked for: no token may be in one but /ws's player token.
await withPage(async (page, { problems, requested }) => {
  await page.goto(options.url + '/console');
  report('loaded', { title: await page.title(), state: await page.textContent('#state') });

  // Connect as the player.
  await page.fill('#player-token', options.playerToken);
  await page.click('#connect');
  await page.waitForSelector('#state[data-state="open"]');
  report('open', { opened: await page.textContent('#opened') });

  // Publish a test event with the server token, and read it from the page.
  await page.fill('#server-token', options.serverToken);
  await page.fill('#player-id', options.playerId);
  await page.fill('#event-name', 'flag_captured');
  await page.fill('#payload', '{"target": "web01", "points": 100}');
  await page.click('#publish');
  const row = await page.waitForSelector('#events tr.event[data-event="flag_captured"]');
  await page.waitForSelector('#publish-result[data-status="200"]');
  report('received', {
    time: await row.$eval('td.time', (cell) => cell.textContent),
    event: await row.$eval('td.name', (cell) => cell.textContent),
    payload: JSON.parse(await row.$eval('td.payload', (cell) => cell.textContent)),
    publishResult: await page.textContent('#publish-result'),
    count: await page.textContent('#event-count'),
  });

  // The test closes the socket from the gateway's side (1001, as a restart does).
  report('waiting', { for: 'closed-1001' });
  await waitForLine('closed-1001');
  await page.waitForSelector('#close-code[data-code="1001"]');
  await page.waitForFunction(() => document.querySelector('#opened').textContent === '2'
    && document.querySelector('#state').dataset.state === 'open');
  const connectionLog = await page.$$eval('#connection-log tr', (rows) => rows.map((r) => r.textContent));
  report('reconnected', { closeCode: await page.textContent('#close-code'), log: connectionLog });

  // Broadcast from the page too, so the screenshot shows a lived-in console.
  await page.fill('#player-id', '');
  await page.fill('#event-name', 'round_over');
  await page.fill('#payload', '{"round": 3}');
  await page.click('#broadcast');
  await page.waitForSelector('#events tr.event[data-event="round_over"]');
  if (options.screenshot) {
    await page.screenshot({ path: options.screenshot, fullPage: true });
  }
  report('broadcast', { count: await page.textContent('#event-count') });

  // The test revokes the token: a 1008 close must not be retried.
  report('waiting', { for: 'revoked' });
  await waitForLine('revoked');
  await page.waitForSelector('#close-code[data-code="1008"]');
  await page.waitForSelector('#state[data-state="closed"]');
  report('stopped', { state: await page.textContent('#state'), detail: await page.textContent('#state-detail'),
                      closeCode: await page.textContent('#close-code'), problems });

  // The operator's view. A wrong server token is refused and stops the watch.
  const serverToken = await page.inputValue('#server-token');
  await page.fill('#server-token', 'not-a-server-token');
  await page.click('#watch');
  await page.waitForSelector('#watch-state[data-state="refused"]');
  // Chromium reports the refused fetch as a console error: that one was asked for.
  const refusal = problems.findIndex((problem) => problem.includes('status of 403'));
  if (refusal >= 0) problems.splice(refusal, 1);
  report('refused', { watchState: await page.textContent('#watch-state') });

  // The test connects players 30 (twice) and 31; the counts follow.
  report('waiting', { for: 'players-connected' });
  await waitForLine('players-connected');
  await page.fill('#server-token', serverToken);
  await page.click('#watch');
  await page.waitForFunction(() => document.querySelector('#count-connections').textContent === '3'
    && document.querySelector('#count-players').textContent === '2');
  await page.waitForFunction(() => document.querySelector('#rate-published').textContent !== '–');
  report('counts', { watchState: await page.getAttribute('#watch-state', 'data-state'),
                     published: await page.textContent('#rate-published'),
                     dropped: await page.textContent('#rate-dropped') });

  // The test publishes meanwhile: the rate shows it.
  report('waiting', { for: 'published' });
  await waitForLine('published');
  await page.waitForFunction(() => Number(document.querySelector('#rate-published').textContent) > 0);
  report('rate', { published: await page.textContent('#rate-published') });

  // Presence of one player, then cut it off.
  await page.fill('#operator-player', '30');
  await page.click('#lookup');
  await page.waitForSelector('#operator-result[data-status="200"]');
  report('presence', { result: await page.textContent('#operator-result') });
  await page.click('#cut-off');
  await page.waitForFunction(() => document.querySelector('#operator-result').textContent.includes('/disconnect'));
  const disconnected = await page.textContent('#operator-result');
  await page.waitForFunction(() => document.querySelector('#count-connections').textContent === '1'
    && document.querySelector('#count-players').textContent === '1');
  if (options.screenshot) {
    await page.screenshot({ path: options.screenshot.replace(/\.png$/, '-operator.png'), fullPage: true });
  }
  report('disconnected', { result: disconnected, status: await page.getAttribute('#operator-result', 'data-status'),
                           connections: await page.textContent('#count-connections'),
                           pageUrl: page.url(), requested, problems });
});
