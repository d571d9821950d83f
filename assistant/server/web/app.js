// Browser client of the voice assistant: websocket protocol v1 (docs/protocol.md).
//
// Start opens the microphone (browser echo cancellation, noise suppression and
// gain control ON: the server does not cancel echo for websocket clients and
// relies on these), an AudioWorklet that sends 20 ms PCM16LE frames at 16 kHz,
// and a session on /ws. Reply audio is played by a second worklet with a small
// jitter buffer; the page reports what was really played (playback.position).
// A dropped connection is retried with backoff, as a new session.
//
// What the user really heard: the page measures voice to voice itself, from
// its microphone's capture of the user's last voiced sample (turn.metrics says
// where that was in the audio sent: speech_end_input_ms) to its speaker's
// output of the reply's first sample (the playback worklet's context time,
// plus the context's base and output latency), and sends it back
// (playback.heard) to be shown beside the server's figure.
//
// window.assistantState is what the page shows, for tests and debugging:
//   status        "idle" | "connecting" | "ready" | "reconnecting" | "stopped" | "failed"
//   connected     true while a session is ready on an open websocket
//   sessionId     the server's id of the current session; sessions: how many were opened
//   inputRate, outputRate   the rates of the current session (Hz)
//   level         microphone RMS of the last 20 ms frame, 0..1
//   finals        every transcript.final text, in order
//   replies       every complete reply text (response.text.done), in order
//   playedSamples reply samples played so far, all turns (at outputRate)
//   underruns     times the playback buffer ran dry in the middle of a turn
//   turns         [{session, turnId, partial, final, reply, status, heardText,
//                   playedSamples, voiceToVoiceMs, heardVoiceToVoiceMs}]; status: "listening" |
//                   "thinking" | "speaking" | "completed" | "interrupted" | "cancelled" | ...
//   errors        [{code, message, fatal}] from the server or the page

const INPUT_RATE = 16000; // asked of the server: its own rate, resampled in the worklet
const FRAME_MS = 20;
const PENDING_FRAMES = 50; // up to 1 s of microphone audio kept while a session opens
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
const STABLE_MS = 5000; // a session that lasted this long resets the backoff

const $ = (id) => document.getElementById(id);
const ui = {
  toggle: $("toggle"),
  conn: $("conn"),
  meter: $("meter"),
  meterBar: $("meter-bar"),
  error: $("error"),
  turns: $("turns"),
  hint: $("hint"),
  latency: $("latency"),
};

const state = {
  status: "idle",
  connected: false,
  sessionId: null,
  sessions: 0,
  inputRate: null,
  outputRate: null,
  level: 0,
  finals: [],
  replies: [],
  playedSamples: 0,
  underruns: 0,
  turns: [],
  errors: [],
};
window.assistantState = state;

let ctx = null; // AudioContext
let stream = null; // microphone MediaStream
let capture = null; // AudioWorkletNode "capture"
let player = null; // AudioWorkletNode "playback"
let ws = null;
let ready = false; // session.ready received on ws
let running = false; // between Start and Stop
let pending = []; // microphone frames ({pcm, ctxTime}) captured before the session was ready
let sentMs = 0; // audio sent in this session, ms: the server's input timeline
let sentFrames = []; // [{endMs, ctxTime}] of this session's recent frames
const SENT_FRAMES_KEPT = 3000; // a minute of 20 ms frames
let audioTurn = null; // turn named by the last response.audio.start
let attempt = 0; // reconnect attempt
let retryTimer = null;
let readyAt = 0;
const turnsByKey = new Map(); // "session/turnId" -> turn
const elements = new WeakMap(); // turn -> its elements on the page

// ---------------------------------------------------------------- display

function setStatus(status, text) {
  state.status = status;
  ui.conn.dataset.state = status;
  ui.conn.textContent = text;
}

function showError(code, message, fatal = false) {
  state.errors.push({ code, message, fatal });
  ui.error.textContent = code ? `${code}: ${message}` : message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

let levelShown = 0;
function showLevel(rms) {
  state.level = rms;
  // dBFS mapped to 0..100: -60 dB is empty, 0 dB full.
  const db = 20 * Math.log10(Math.max(rms, 1e-6));
  const pct = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
  levelShown = Math.max(pct, levelShown * 0.85); // fast attack, slow release
  ui.meterBar.style.width = `${levelShown.toFixed(0)}%`;
  ui.meter.setAttribute("aria-valuenow", levelShown.toFixed(0));
}

function turnFor(turnId) {
  const key = `${state.sessions}/${turnId}`;
  let turn = turnsByKey.get(key);
  if (!turn) {
    turn = {
      session: state.sessions,
      turnId,
      partial: "",
      final: null,
      reply: "",
      status: "listening",
      heardText: null,
      playedSamples: 0,
      voiceToVoiceMs: null,
      heardVoiceToVoiceMs: null,
      speechEndInputMs: null,
      firstSampleCtxTime: null,
    };
    turnsByKey.set(key, turn);
    state.turns.push(turn);
    const el = makeTurnElement();
    elements.set(turn, el);
    ui.turns.append(el.li);
    ui.hint.hidden = true;
  }
  return turn;
}

function makeTurnElement() {
  const li = document.createElement("li");
  li.className = "turn";
  li.innerHTML = `
    <p class="user"><span class="who">You</span> <span class="text"></span></p>
    <p class="assistant"><span class="who">Assistant</span> <span class="text"></span></p>
    <p class="meta"></p>`;
  return {
    li,
    user: li.querySelector(".user .text"),
    reply: li.querySelector(".assistant .text"),
    assistant: li.querySelector(".assistant"),
    meta: li.querySelector(".meta"),
  };
}

function render(turn) {
  const el = elements.get(turn);
  el.li.dataset.status = turn.status;
  // Streaming text is announced once the turn settles, not word by word.
  el.li.setAttribute("aria-busy", String(["listening", "thinking", "speaking"].includes(turn.status)));
  if (turn.final !== null) {
    el.user.textContent = turn.final;
    el.user.classList.remove("partial");
  } else {
    el.user.textContent = turn.partial || "…";
    el.user.classList.add("partial");
  }
  el.assistant.hidden = !turn.reply && turn.status !== "thinking";
  el.reply.textContent = "";
  if (turn.status === "interrupted" && turn.heardText !== null && turn.reply.startsWith(turn.heardText)) {
    // What was heard, then what was cut off.
    el.reply.append(turn.heardText);
    const cut = document.createElement("span");
    cut.className = "unheard";
    cut.textContent = turn.reply.slice(turn.heardText.length);
    el.reply.append(cut);
  } else {
    el.reply.textContent = turn.reply || (turn.status === "thinking" ? "…" : "");
  }
  const meta = [];
  if (turn.voiceToVoiceMs !== null) meta.push(`voice-to-voice ${Math.round(turn.voiceToVoiceMs)} ms`);
  if (turn.heardVoiceToVoiceMs !== null) meta.push(`heard here after ${Math.round(turn.heardVoiceToVoiceMs)} ms`);
  if (["interrupted", "cancelled", "failed"].includes(turn.status)) meta.push(turn.status);
  for (const call of turn.tools || []) meta.push(`${call.name}: ${call.status}`);
  if (turn.overBudget) meta.push(`over budget: ${turn.overBudget.join(", ")}`);
  el.meta.textContent = meta.join(" · ");
  el.meta.classList.toggle("late", Boolean(turn.late));
  el.li.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------- audio

async function startAudio() {
  ctx = new AudioContext({ latencyHint: "interactive" });
  if (ctx.sampleRate > 48000 || ctx.sampleRate < 8000) {
    // The protocol takes 8000-48000 Hz; let the browser resample the rest.
    await ctx.close();
    ctx = new AudioContext({ latencyHint: "interactive", sampleRate: 48000 });
  }
  await ctx.audioWorklet.addModule("worklet.js");
  stream = await navigator.mediaDevices.getUserMedia({
    audio: {
      // The assistant listens while it speaks (barge-in) and counts on the
      // browser to remove its own voice from the microphone.
      echoCancellation: true,
      noiseSuppression: true,
      autoGainControl: true,
      channelCount: 1,
    },
    video: false,
  });
  const source = ctx.createMediaStreamSource(stream);
  state.inputRate = ctx.sampleRate > INPUT_RATE ? INPUT_RATE : ctx.sampleRate;
  capture = new AudioWorkletNode(ctx, "capture", {
    numberOfInputs: 1,
    numberOfOutputs: 0,
    channelCount: 1,
    channelCountMode: "explicit",
    channelInterpretation: "speakers",
    processorOptions: { targetRate: state.inputRate, frameMs: FRAME_MS },
  });
  capture.port.onmessage = (e) => onMicFrame(e.data);
  source.connect(capture);
  player = new AudioWorkletNode(ctx, "playback", { numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1] });
  player.port.onmessage = (e) => onPlayer(e.data);
  player.connect(ctx.destination);
  await ctx.resume();
}

function stopAudio() {
  if (capture) capture.port.postMessage({ type: "stop" });
  if (stream) for (const track of stream.getTracks()) track.stop();
  if (ctx) ctx.close().catch(() => {});
  ctx = stream = capture = player = null;
  showLevel(0);
}

function onMicFrame(msg) {
  if (msg.type !== "frame") return;
  showLevel(msg.rms);
  const frame = { pcm: msg.pcm, ctxTime: msg.ctxTime };
  if (ws && ready && ws.readyState === WebSocket.OPEN) {
    sendFrame(frame);
  } else if (running) {
    pending.push(frame);
    if (pending.length > PENDING_FRAMES) pending.shift();
  }
}

function sendFrame(frame) {
  ws.send(frame.pcm);
  sentMs += ((frame.pcm.byteLength >> 1) / state.inputRate) * 1000;
  sentFrames.push({ endMs: sentMs, ctxTime: frame.ctxTime });
  if (sentFrames.length > SENT_FRAMES_KEPT) sentFrames.shift();
}

function inputLatency() {
  const latency = stream?.getAudioTracks()[0]?.getSettings?.().latency;
  return typeof latency === "number" && latency >= 0 ? latency : 0;
}

// The context time the sample at `ms` of this session's input was captured
// (null when it is no longer, or not yet, among the frames kept).
function capturedAt(ms) {
  const frame = sentFrames.find((f) => f.endMs >= ms);
  if (!frame || (frame === sentFrames[0] && frame.endMs - ms > FRAME_MS)) return null;
  return frame.ctxTime - (frame.endMs - ms) / 1000 - inputLatency();
}

function maybeHeard(turn) {
  if (turn.heardVoiceToVoiceMs !== null || turn.speechEndInputMs === null || turn.firstSampleCtxTime === null) return;
  if (!ctx || turn.session !== state.sessions) return;
  const spoke = capturedAt(turn.speechEndInputMs);
  if (spoke === null) return;
  const heard = turn.firstSampleCtxTime + (ctx.baseLatency || 0) + (ctx.outputLatency || 0);
  const ms = (heard - spoke) * 1000;
  if (!(ms > 0 && ms < 600000)) return; // not a latency: a clock this page cannot map
  turn.heardVoiceToVoiceMs = ms;
  send({ type: "playback.heard", turn_id: turn.turnId, voice_to_voice_ms: Math.round(ms * 10) / 10 });
  if (turn.voiceToVoiceMs !== null) {
    ui.latency.textContent =
      `Last turn: ${Math.round(turn.voiceToVoiceMs)} ms voice-to-voice at the server, ${Math.round(ms)} ms heard here`;
  }
  render(turn);
}

function stopPlayback() {
  if (player) player.port.postMessage({ type: "stop" });
}

function onPlayer(msg) {
  const turn = turnsByKey.get(msg.turn);
  if (!turn) return;
  if (msg.type === "started") {
    turn.firstSampleCtxTime = msg.ctxTime;
    maybeHeard(turn);
    return;
  }
  state.underruns = msg.underruns;
  turn.playedSamples = msg.samples;
  state.playedSamples = state.turns.reduce((sum, t) => sum + t.playedSamples, 0);
  if (msg.type === "done" || msg.type === "stopped") turn.playing = false;
  // Positions of an earlier session mean nothing to the current one.
  if (turn.session === state.sessions && ws && ready && ws.readyState === WebSocket.OPEN) {
    if (msg.samples !== turn.sentSamples || msg.type !== "position") {
      turn.sentSamples = msg.samples;
      send({ type: "playback.position", turn_id: turn.turnId, samples: msg.samples });
    }
  }
}

// ---------------------------------------------------------------- websocket

function wsUrl() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  const token = new URLSearchParams(location.search).get("token");
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

function send(obj) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
}

function connect() {
  retryTimer = null;
  ready = false;
  state.connected = false;
  setStatus(attempt ? "reconnecting" : "connecting", attempt ? "Reconnecting…" : "Connecting…");
  const sock = new WebSocket(wsUrl());
  sock.binaryType = "arraybuffer";
  ws = sock;
  sock.onopen = () => {
    sock.send(
      JSON.stringify({
        type: "session.start",
        protocol: 1,
        input_rate: state.inputRate,
        output_rate: ctx.sampleRate,
        client: `browser ${navigator.userAgent}`.slice(0, 200),
      }),
    );
  };
  sock.onmessage = (e) => {
    if (sock !== ws) return;
    if (typeof e.data === "string") onEvent(JSON.parse(e.data));
    else onAudio(e.data);
  };
  sock.onclose = (e) => {
    if (sock !== ws) return;
    onClosed(e);
  };
  sock.onerror = () => {}; // onclose follows with the code
}

function onClosed(e) {
  const wasReady = ready;
  ws = null;
  ready = false;
  state.connected = false;
  audioTurn = null;
  stopPlayback();
  if (!running) {
    setStatus("stopped", "Stopped");
    return;
  }
  if (e.code === 1008) {
    // A protocol or rate violation: retrying would repeat it.
    setStatus("failed", `Disconnected: ${e.reason || "refused by the server"}`);
    showError("protocol", e.reason || "the server refused the session");
    stop(false);
    return;
  }
  if (wasReady && performance.now() - readyAt > STABLE_MS) attempt = 0;
  const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)] * (0.75 + Math.random() * 0.5);
  attempt += 1;
  const why = e.code === 1013 ? "server busy" : e.reason || `connection lost (${e.code})`;
  setStatus("reconnecting", `Disconnected (${why}); retrying in ${(delay / 1000).toFixed(1)} s`);
  retryTimer = setTimeout(connect, delay);
}

function onAudio(buf) {
  const turn = audioTurn;
  if (!turn || !player || ["interrupted", "cancelled"].includes(turn.status)) return;
  const pcm = new Int16Array(buf.byteLength >> 1);
  const view = new DataView(buf);
  const samples = new Float32Array(pcm.length);
  for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(i * 2, true) / 32768;
  turn.playing = true;
  player.port.postMessage({ type: "audio", turn: `${turn.session}/${turn.turnId}`, samples }, [samples.buffer]);
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.ready": {
      ready = true;
      readyAt = performance.now();
      state.connected = true;
      state.sessions += 1;
      state.sessionId = ev.session_id;
      state.outputRate = ev.output_rate;
      if (ev.input_rate !== state.inputRate) {
        showError("page", `server expects ${ev.input_rate} Hz input, page sends ${state.inputRate} Hz`);
      }
      setStatus("ready", `Connected · session ${ev.session_id} · listening`);
      clearError();
      sentMs = 0; // a new session: its input timeline starts here
      sentFrames = [];
      for (const frame of pending) sendFrame(frame);
      pending = [];
      return;
    }
    case "speech.started": {
      // The server heard the user start a new turn over reply audio that is
      // still playing (barge_in): it has decided the user takes over, so stop
      // at once, before response.interrupted even arrives. Without barge_in
      // the server counts the reply as played out: its tail plays on.
      if (ev.barge_in !== false && state.turns.some((t) => t.playing && t.turnId !== ev.turn_id)) stopPlayback();
      render(turnFor(ev.turn_id));
      return;
    }
    case "speech.stopped": {
      const turn = turnFor(ev.turn_id);
      if (turn.status === "listening") turn.status = "thinking";
      render(turn);
      return;
    }
    case "transcript.partial": {
      const turn = turnFor(ev.turn_id);
      turn.partial = ev.text;
      render(turn);
      return;
    }
    case "transcript.final": {
      const turn = turnFor(ev.turn_id);
      turn.final = ev.text;
      state.finals.push(ev.text);
      render(turn);
      return;
    }
    case "response.text.delta": {
      const turn = turnFor(ev.turn_id);
      turn.reply += ev.text;
      render(turn);
      return;
    }
    case "response.text.done": {
      const turn = turnFor(ev.turn_id);
      turn.reply = ev.text;
      state.replies.push(ev.text);
      render(turn);
      return;
    }
    case "response.cancelled": {
      // An early reply was thrown away (the user went on speaking): its text
      // goes, and so does any of its audio.
      const turn = turnFor(ev.turn_id);
      turn.reply = "";
      if (turn.playing) stopPlayback();
      if (audioTurn === turn) audioTurn = null;
      turn.status = turn.final === null ? "listening" : "thinking";
      render(turn);
      return;
    }
    case "response.audio.start": {
      const turn = turnFor(ev.turn_id);
      audioTurn = turn;
      turn.status = "speaking";
      if (ev.sample_rate && ctx && ev.sample_rate !== ctx.sampleRate) {
        showError("page", `reply audio at ${ev.sample_rate} Hz, page plays ${ctx.sampleRate} Hz`);
      }
      render(turn);
      return;
    }
    case "response.audio.end": {
      const turn = turnFor(ev.turn_id);
      if (player) player.port.postMessage({ type: "end", turn: `${turn.session}/${turn.turnId}` });
      if (audioTurn === turn) audioTurn = null;
      return;
    }
    case "response.interrupted": {
      // Barge-in: stop at once, drop what is buffered.
      const turn = turnFor(ev.turn_id);
      stopPlayback();
      turn.status = "interrupted";
      turn.heardText = ev.heard_text ?? null;
      if (audioTurn === turn) audioTurn = null;
      render(turn);
      return;
    }
    case "turn.metrics": {
      const turn = turnFor(ev.turn_id);
      turn.voiceToVoiceMs = ev.voice_to_voice_ms ?? null;
      turn.speechEndInputMs = ev.speech_end_input_ms ?? null;
      if (ev.interrupted) turn.status = "interrupted";
      else if (turn.status !== "interrupted") turn.status = ev.status || "completed";
      const over = Object.entries(ev.budgets || {}).filter(([, b]) => b && b.exceeded);
      if (over.length) turn.overBudget = over.map(([name]) => name);
      turn.late = Boolean(ev.budgets?.voice_to_voice?.exceeded);
      render(turn);
      // A turn opened by noise, with no words and no reply: not worth a card.
      if (turn.status === "cancelled" && !turn.final && !turn.reply) elements.get(turn).li.hidden = true;
      if (turn.voiceToVoiceMs !== null) {
        ui.latency.textContent = `Last turn: ${Math.round(turn.voiceToVoiceMs)} ms voice-to-voice`;
      }
      maybeHeard(turn);
      return;
    }
    case "tool.call": {
      // The reply looks something up: shown on the turn's card until its result comes.
      const turn = turnFor(ev.turn_id);
      turn.tools = [...(turn.tools || []), ...ev.calls.map((c) => ({ id: c.call_id, name: c.name, status: "calling…" }))];
      render(turn);
      return;
    }
    case "tool.result": {
      const turn = turnFor(ev.turn_id);
      for (const call of turn.tools || []) {
        if (call.id === ev.call_id) call.status = ev.error ? "failed" : `${Math.round(ev.elapsed_ms)} ms`;
      }
      render(turn);
      return;
    }
    case "budget.exceeded":
      return; // shown with the turn's metrics
    case "error":
      showError(ev.code, ev.message, ev.fatal);
      return;
    case "session.ended":
      setStatus(running ? "reconnecting" : "stopped", `Session ended: ${ev.reason}`);
      return;
    default:
      return; // newer events are ignored
  }
}

// ---------------------------------------------------------------- start / stop

async function start() {
  running = true;
  attempt = 0;
  pending = [];
  clearError();
  ui.toggle.textContent = "Stop";
  ui.toggle.setAttribute("aria-pressed", "true");
  setStatus("connecting", "Opening the microphone…");
  try {
    await startAudio();
  } catch (err) {
    showError("microphone", `${err.name || "Error"}: ${err.message}`);
    stop(false);
    setStatus("failed", "No microphone");
    return;
  }
  connect();
}

function stop(tellServer = true) {
  running = false;
  if (retryTimer) clearTimeout(retryTimer);
  retryTimer = null;
  const sock = ws;
  if (sock && tellServer && sock.readyState === WebSocket.OPEN) {
    send({ type: "session.end" });
    setTimeout(() => sock.close(1000), 1000); // the server closes first, normally
  } else if (sock) {
    sock.close(1000);
  }
  stopPlayback();
  stopAudio();
  ready = false;
  state.connected = false;
  pending = [];
  ui.toggle.textContent = "Start";
  ui.toggle.setAttribute("aria-pressed", "false");
  if (state.status !== "failed") setStatus("stopped", "Stopped");
}

ui.toggle.addEventListener("click", () => (running ? stop() : start()));
ui.toggle.disabled = false;
