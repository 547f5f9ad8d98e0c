// Drives an EventSource in Debian's headless Chromium for tests/test_sse_browser.py: the test
// sends one JSON command per line on stdin and reads one JSON report per line on stdout.
//
//   node event_source_check.mjs '{"page": "http://127.0.0.1:PORT/healthz"}'
//
//   {"cmd": "open", "url": "/events?token=...", "events": ["score", "gateway.close"]}
//        a new EventSource, listening for those event names (and unnamed "message" events)
//   {"cmd": "wait", "events": N, "opens": M}   until N events and M open events have arrived
//   {"cmd": "state"}                           readyState and everything seen so far
//   {"cmd": "quit"}
// Every report carries what was seen: events [{type, data, lastEventId}], opens, errors, readyState.
import { nextLine, report, withPage } from './harness.mjs';

const options = JSON.parse(process.argv[2]);

await withPage(async (page, { problems }) => {
  await page.goto(options.page);
  const seen = () => page.evaluate(() => ({
    events: window.streamEvents, opens: window.streamOpens, errors: window.streamErrors,
    readyState: window.stream ? window.stream.readyState : null,
  }));
  report('loaded');
  for (let line = await nextLine(); line !== null; line = await nextLine()) {
    const command = JSON.parse(line);
    if (command.cmd === 'open') {
      await page.evaluate(({ url, events }) => {
        window.streamEvents = []; window.streamOpens = 0; window.streamErrors = 0;
        const source = window.stream = new EventSource(url);
        const record = (event) => window.streamEvents.push(
          { type: event.type, data: JSON.parse(event.data), lastEventId: event.lastEventId });
        for (const name of events) source.addEventListener(name, record);
        source.onmessage = record;
        source.onopen = () => { window.streamOpens += 1; };
        source.onerror = () => { window.streamErrors += 1; };
      }, command);
      report('opened');
    } else if (command.cmd === 'wait') {
      await page.waitForFunction(({ events, opens }) => window.streamEvents.length >= (events || 0)
        && window.streamOpens >= (opens || 0), command);
      report('waited', { ...(await seen()), problems });
    } else if (command.cmd === 'state') {
      report('state', { ...(await seen()), problems });
    } else if (command.cmd === 'quit') {
      break;
    }
  }
});
