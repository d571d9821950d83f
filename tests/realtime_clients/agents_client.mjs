// A real OpenAI Realtime client for the tests: @openai/agents-realtime's
// websocket transport, unmodified, pointed at the server by `url`.
// Usage: node agents_client.mjs URL QUESTION.pcm [--tool] (raw PCM16, 24 kHz).
// Prints one JSON line per server event ({"t", "in"}) and per client mark.
// With --tool (or AGENTS_TOOL=1) a RealtimeSession drives the same transport with
// one function tool, get_weather(city), forced by tool_choice; the SDK runs it and
// each run prints {"mark": "tool_start"|"tool_end", name, call_id, arguments[, result]}.
import { readFileSync } from 'node:fs';
import { OpenAIRealtimeWebSocket, RealtimeAgent, RealtimeSession, tool } from '@openai/agents-realtime';

const [url, pcmPath, ...flags] = process.argv.slice(2);
const toolMode = flags.includes('--tool') || Boolean(process.env.AGENTS_TOOL);
const log = (fields) => console.log(JSON.stringify({ t: performance.now() / 1000, ...fields }));
const transport = new OpenAIRealtimeWebSocket();
let done = false;
transport.on('*', (event) => {
  log({ in: event });
  // In tool mode the response that only calls the tool is not the end: the one after its output is.
  if (event.type === 'response.done'
      && !(toolMode && (event.response?.output ?? []).some((item) => item?.type === 'function_call'))) done = true;
});
transport.on('error', (error) => log({ mark: 'error', error: String(error?.error?.error?.code ?? error) }));

if (toolMode) {
  const getWeather = tool({
    name: 'get_weather',
    description: 'Get the current weather in a city.',
    parameters: {
      type: 'object',
      properties: { city: { type: 'string', description: 'The city, e.g. Paris' } },
      required: ['city'],
      additionalProperties: false,
    },
    strict: true,
    execute: async ({ city }) => `Sunny, 18 degrees Celsius in ${city}`,
  });
  const agent = new RealtimeAgent({
    name: 'weather',
    instructions: 'Answer weather questions with the get_weather tool.',
    tools: [getWeather],
  });
  const session = new RealtimeSession(agent, {
    transport,
    model: 'local-model',
    // Sent as-is as session.tool_choice (the SDK does not reshape it).
    config: { toolChoice: { type: 'function', name: 'get_weather' } },
  });
  const call = ({ toolCall }) => ({ name: toolCall.name, call_id: toolCall.callId, arguments: toolCall.arguments });
  session.on('agent_tool_start', (_context, _agent, _tool, details) => log({ mark: 'tool_start', ...call(details) }));
  session.on('agent_tool_end', (_context, _agent, _tool, result, details) => log({ mark: 'tool_end', ...call(details), result }));
  // Errors from the session itself (tool dispatch, bad arguments); transport errors are logged above.
  session.on('error', ({ error }) => {
    if (error?.type !== 'error') log({ mark: 'error', error: String(error?.message ?? error) });
  });
  await session.connect({ apiKey: 'test-key', url });
} else {
  await transport.connect({ apiKey: 'test-key', url, model: 'local-model' });
}
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
