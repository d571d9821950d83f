// A real OpenAI Realtime client for the tests: @openai/agents-realtime's
// websocket transport, unmodified, pointed at the server by `url`.
// Usage: node agents_client.mjs URL QUESTION.pcm (raw PCM16, 24 kHz).
// Prints one JSON line per server event ({"t", "in"}) and per client mark.
import { readFileSync } from 'node:fs';
import { OpenAIRealtimeWebSocket } from '@openai/agents-realtime';

const [url, pcmPath] = process.argv.slice(2);
const log = (fields) => console.log(JSON.stringify({ t: performance.now() / 1000, ...fields }));
const transport = new OpenAIRealtimeWebSocket();
let done = false;
transport.on('*', (event) => {
  log({ in: event });
  if (event.type === 'response.done') done = true;
});
transport.on('error', (error) => log({ mark: 'error', error: String(error?.error?.error?.code ?? error) }));

await transport.connect({ apiKey: 'test-key', url, model: 'local-model' });
const question = readFileSync(pcmPath);
const chunk = 24000 * 2 * 40 / 1000;
const silence = new ArrayBuffer(chunk);
const start = performance.now();
let sent = 0;
for (let offset = 0; !done && sent < 2000; offset += chunk, sent += 1) {
  if (offset < question.length) {
    const piece = question.subarray(offset, offset + chunk);
    transport.sendAudio(piece.buffer.slice(piece.byteOffset, piece.byteOffset + piece.length));
    if (offset + chunk >= question.length) log({ mark: 'clip_end' });
  } else {
    transport.sendAudio(silence);
  }
  await new Promise((r) => setTimeout(r, Math.max(0, start + (sent + 1) * 40 - performance.now())));
}
log({ mark: done ? 'done' : 'timeout' });
transport.close();
process.exit(0);
