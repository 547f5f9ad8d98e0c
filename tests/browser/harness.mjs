// What the browser scripts share: Debian's headless Chromium with one page on the
// console, step reports as JSON lines on stdout, and lines from the test on stdin (the
// script waits for one where the test must act on the gateway before it goes on).
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

export const STEP_TIMEOUT_MS = Number(process.env.STEP_TIMEOUT_MS || 15000);
const input = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

export function report(step, details = {}) {
  process.stdout.write(JSON.stringify({ step, ...details }) + '\n');
}

export async function waitForLine(expected) {
  const value = await nextLine();
  if (value === null || value.trim() !== expected) throw new Error(`expected "${expected}" on stdin, got ${value}`);
}

// The next line from the test, or null once stdin has ended.
export async function nextLine() {
  const { value, done } = await input.next();
  return done ? null : value;
}

// Runs `steps(page, watched)` on a fresh page in a fresh headless Chromium, always closed
// afterwards. `watched.problems`: the page's errors and console errors; `watched.requested`:
// every URL it asked for.
export async function withPage(steps) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 860 } });
    page.setDefaultTimeout(STEP_TIMEOUT_MS);
    const watched = { problems: [], requested: [] };
    page.on('pageerror', (error) => watched.problems.push(String(error)));
    page.on('console', (message) => { if (message.type() === 'error') watched.problems.push(message.text()); });
    page.on('request', (request) => watched.requested.push(request.url()));
    await steps(page, watched);
  } finally {
    await browser.close();
  }
  process.exit(0);
}
