// One spoken turn through the browser client, in a real (headless) Chromium.
//
//   node tests/browser/browser_turn.mjs --url http://127.0.0.1:PORT/ \
//        --wav audio_assets/browser/capital_of_france_30s.wav --screenshot out.png [--timeout 90]
//
// Chromium's fake microphone plays the WAV (looped); the page is opened, Start
// is clicked, and the script waits until the page shows a final transcript and
// has played reply audio (window.assistantState, see assistant/server/web/app.js),
// then for the turn's metrics, takes a screenshot, presses Stop and prints one
// JSON object on stdout: {ok, final, reply, playedSamples, voiceToVoiceMs,
// heardVoiceToVoiceMs, state, console, elapsedMs}. Exit status: 0 ok, 1 timed out (the JSON says
// what was missing), 2 bad arguments, 3 the browser could not be started.

import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    wav: { type: "string" },
    screenshot: { type: "string" },
    timeout: { type: "string", default: "90" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    width: { type: "string", default: "412" },
    height: { type: "string", default: "640" },
  },
});

function fail(code, message, extra = {}) {
  process.stderr.write(`browser_turn: ${message}\n`);
  process.stdout.write(JSON.stringify({ ok: false, error: message, ...extra }) + "\n");
  process.exit(code);
}

if (!args.url || !args.wav || !args.screenshot) {
  fail(2, "usage: browser_turn.mjs --url URL --wav FILE.wav --screenshot OUT.png [--timeout S]");
}
const wav = resolve(args.wav);
if (!existsSync(wav)) fail(2, `no such WAV: ${wav}`);
if (!existsSync(args.chromium)) fail(3, `no Chromium at ${args.chromium} (apt-get install chromium)`);
const timeoutMs = Number(args.timeout) * 1000;
const started = Date.now();

const profile = mkdtempSync(join(tmpdir(), "va-chromium-"));
const consoleLines = [];
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: args.chromium,
    headless: true,
    viewport: { width: Number(args.width), height: Number(args.height) },
    deviceScaleFactor: 1,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${wav}`,
      "--autoplay-policy=no-user-gesture-required",
      // No sound card is needed (nor touched): output goes to a fake device
      // that still pulls audio at real-time pace, so the page plays as usual.
      "--disable-audio-output",
    ],
  });
} catch (err) {
  rmSync(profile, { recursive: true, force: true });
  fail(3, `could not start Chromium: ${err.message.split("\n")[0]}`);
}

const snapshot = (page) =>
  page.evaluate(() => JSON.parse(JSON.stringify(window.assistantState ?? null))).catch(() => null);

let code = 0;
let result;
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (err) => consoleLines.push(`pageerror: ${err.message}`));
  await page.goto(args.url, { waitUntil: "load", timeout: 20000 });
  await page.getByRole("button", { name: "Start" }).click();

  const left = () => Math.max(1000, timeoutMs - (Date.now() - started));
  let missing = null;
  try {
    await page.waitForFunction(
      () => {
        const s = window.assistantState;
        return s && s.finals.length > 0 && s.playedSamples > 0;
      },
      null,
      { timeout: left(), polling: 100 },
    );
    // The turn's metrics (voice-to-voice latency) come when its audio is done.
    await page
      .waitForFunction(
        () => {
          const t = window.assistantState.turns.find((x) => x.final !== null);
          // ... and what the page itself measured (playback.heard).
          return t && t.voiceToVoiceMs !== null && t.heardVoiceToVoiceMs !== null && !t.playing;
        },
        null,
        { timeout: Math.min(20000, left()), polling: 100 },
      )
      .catch(() => consoleLines.push("note: no turn.metrics for the turn before the screenshot"));
  } catch {
    const s = await snapshot(page);
    missing = [];
    if (!s?.connected) missing.push(`a session (status ${s?.status})`);
    if (!s?.finals?.length) missing.push("a final transcript");
    if (!(s?.playedSamples > 0)) missing.push("reply audio played");
  }
  await page.screenshot({ path: args.screenshot, fullPage: true });
  const state = await snapshot(page);
  const turn = state?.turns?.find((t) => t.final !== null) ?? null;
  if (!missing) {
    // End the session cleanly (session.end), as a user pressing Stop.
    await page.getByRole("button", { name: "Stop" }).click();
    await page.waitForFunction(() => window.assistantState.status === "stopped", null, { timeout: 5000 }).catch(() => {});
  }
  result = {
    ok: !missing,
    final: turn?.final ?? null,
    reply: turn?.reply ?? null,
    playedSamples: state?.playedSamples ?? 0,
    outputRate: state?.outputRate ?? null,
    voiceToVoiceMs: turn?.voiceToVoiceMs ?? null,
    heardVoiceToVoiceMs: turn?.heardVoiceToVoiceMs ?? null,
    elapsedMs: Date.now() - started,
    screenshot: resolve(args.screenshot),
    state,
    console: consoleLines,
  };
  if (missing) {
    code = 1;
    result.error = `timed out after ${args.timeout} s waiting for ${missing.join(", ")}`;
    process.stderr.write(`browser_turn: ${result.error}\n`);
  }
} catch (err) {
  code = 1;
  result = { ok: false, error: `browser_turn failed: ${err.message.split("\n")[0]}`, console: consoleLines };
  process.stderr.write(`${result.error}\n`);
} finally {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(result) + "\n");
process.exit(code);
