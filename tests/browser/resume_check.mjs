// Drives the console through resumes, for tests/test_console.py: its socket lost while
// events are published (recovered: each one shown once, in order), then a gateway whose
// history is gone (not recovered: the gateway.missed notice, then the new ids).
//
//   node resume_check.mjs '{"url": "http://127.0.0.1:PORT", "playerToken": "...", "screenshot": "path or null"}'
import { report, waitForLine, withPage } from './harness.mjs';

const options = JSON.parse(process.argv[2]);

async function shown(page) {
  return page.$$eval('#events tr.event', (rows) => rows.reverse().map((row) => ({
    event: row.dataset.event, id: row.dataset.id, payload: row.querySelector('td.payload').textContent })));
}

async function recovery(page) {
  return { state: await page.getAttribute('#recovery', 'data-state'), text: await page.textContent('#recovery'),
           lastId: await page.textContent('#last-id'),
           log: await page.$$eval('#connection-log tr', (rows) => rows.map((row) => row.textContent)) };
}

function eventCount(count) {
  return document.querySelectorAll('#events tr.event').length >= count;
}

await withPage(async (page, { problems }) => {
  await page.goto(options.url + '/console');
  await page.fill('#player-token', options.playerToken);
  await page.click('#connect');
  await page.waitForSelector('#state[data-state="open"]');
  report('open', await recovery(page));

  // The test publishes 0..2; then the page's socket is cut while 3..5 are published.
  await page.waitForFunction(eventCount, 3);
  report('waiting', { for: 'published-while-away', events: await shown(page) });
  await waitForLine('published-while-away');
  await page.waitForFunction(eventCount, 6);
  await page.waitForSelector('#recovery[data-state="recovered"]');
  report('recovered', { ...await recovery(page), events: await shown(page),
                        opened: await page.textContent('#opened') });

  // The test moves the page to a gateway that never had its history.
  report('waiting', { for: 'history-lost' });
  await waitForLine('history-lost');
  await page.waitForSelector('#recovery[data-state="lost"]');
  report('not-recovered', await recovery(page));
  report('waiting', { for: 'published-after' });
  await waitForLine('published-after');
  await page.waitForFunction(eventCount, 8);
  if (options.screenshot) await page.screenshot({ path: options.screenshot, fullPage: true });
  // Chromium reports each refused WebSocket as a console error: those were asked for.
  report('after', { ...await recovery(page), events: await shown(page),
                    problems: problems.filter((problem) => !problem.startsWith('WebSocket connection to')) });
});
