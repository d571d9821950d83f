// Audio worklets of the browser client (loaded once with audioWorklet.addModule).
//
// capture:  microphone -> mono -> low-pass + resample to the session's input
//           rate -> 20 ms PCM16LE frames (ArrayBuffer) posted to the main
//           thread, with the frame's RMS and peak for the level meter, and
//           the AudioContext time its last sample was in the graph (the end
//           of the render quantum that completed it: within 3 ms).
//
//           Rate choice: the page asks the server for input_rate 16000 (the
//           server's own rate) and resamples here, instead of sending the
//           AudioContext rate (usually 48000) for the server to resample: a
//           third of the upstream bandwidth, no resampling on the server, and
//           the anti-alias filter is ours. The page falls back to sending at
//           the context rate when it is not above 16000 (rare devices).
//
// playback: reply audio (Float32, already at the context rate: the page asks
//           for output_rate = AudioContext.sampleRate, the server resamples)
//           played from a queue with a small jitter buffer. Frames of a turn
//           are contiguous, so they are concatenated sample for sample (no
//           crossfade). The queue primes with PRIME_MS of audio (or the turn's
//           end) before playing and re-primes after an underrun, so a late
//           packet gives one short gap instead of crackle. `stop` drops the
//           queue at once after a 4 ms fade (no click). It reports, per turn,
//           how many samples were really played: every ~100 ms while playing,
//           and when the turn's audio is done or stopped; and the context time
//           its first sample was rendered ("started"), from which the page
//           knows when the user first heard the reply.

const FIR_TAPS = 47; // odd: linear phase, integer delay

function lowPassTaps(cutoff, taps) {
  // Windowed-sinc (Blackman) low-pass; cutoff as a fraction of the sample rate.
  const h = new Float32Array(taps);
  const m = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - m;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.targetRate = opts.targetRate || 16000;
    const frameMs = opts.frameMs || 20;
    this.step = sampleRate / this.targetRate; // input samples per output sample
    this.frameLen = Math.round((this.targetRate * frameMs) / 1000);
    this.taps = this.step > 1 ? lowPassTaps((0.45 * this.targetRate) / sampleRate, FIR_TAPS) : null;
    this.hist = new Float32Array(FIR_TAPS - 1); // last inputs, for the FIR across blocks
    this.prev = 0; // last filtered sample of the previous block
    this.base = 0; // absolute index of the first filtered sample of this block
    this.next = 0; // absolute (fractional) input index of the next output sample
    this.newFrame();
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "stop") this.running = false;
    };
  }

  newFrame() {
    this.buf = new ArrayBuffer(this.frameLen * 2);
    this.view = new DataView(this.buf);
    this.fill = 0;
    this.sumSq = 0;
    this.peak = 0;
  }

  push(s) {
    const v = s > 1 ? 1 : s < -1 ? -1 : s;
    this.view.setInt16(this.fill * 2, v < 0 ? v * 0x8000 : v * 0x7fff, true); // PCM16 little-endian
    this.sumSq += v * v;
    const a = Math.abs(v);
    if (a > this.peak) this.peak = a;
    if (++this.fill === this.frameLen) {
      const rms = Math.sqrt(this.sumSq / this.frameLen);
      this.port.postMessage({ type: "frame", pcm: this.buf, rms, peak: this.peak, ctxTime: this.quantumEnd }, [this.buf]);
      this.newFrame();
    }
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true;
    const n = input[0].length;
    this.quantumEnd = currentTime + n / sampleRate;
    // Downmix to mono.
    const mono = new Float32Array(n);
    for (const ch of input) for (let i = 0; i < n; i++) mono[i] += ch[i];
    if (input.length > 1) for (let i = 0; i < n; i++) mono[i] /= input.length;

    if (this.step === 1) {
      for (let i = 0; i < n; i++) this.push(mono[i]);
      return true;
    }
    // Anti-alias low-pass (only when downsampling).
    let y = mono;
    if (this.taps) {
      const taps = this.taps;
      const t = taps.length;
      const ext = new Float32Array(t - 1 + n);
      ext.set(this.hist, 0);
      ext.set(mono, t - 1);
      y = new Float32Array(n);
      for (let i = 0; i < n; i++) {
        let acc = 0;
        for (let k = 0; k < t; k++) acc += taps[k] * ext[i + k];
        y[i] = acc;
      }
      this.hist = ext.slice(n);
    }
    // Fractional resampling by linear interpolation over the filtered signal;
    // seq[0] is absolute index base-1 (the previous block's last sample).
    const last = this.base + n - 1;
    while (this.next < last) {
      const rel = this.next - (this.base - 1);
      const i = Math.floor(rel);
      const frac = rel - i;
      const a = i === 0 ? this.prev : y[i - 1];
      const b = y[i];
      this.push(a + (b - a) * frac);
      this.next += this.step;
    }
    this.prev = y[n - 1];
    this.base += n;
    return true;
  }
}

const PRIME_MS = 80; // jitter buffer before a turn starts (and after an underrun)
const REPORT_MS = 100; // position reports while playing
const FADE_MS = 4; // fade-out on stop, so an interruption does not click

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    // {turn, data: Float32Array, off} audio, or {turn, end: true}: the end of
    // a segment of the turn's audio (response.audio.end).
    this.queue = [];
    this.queued = 0; // audio samples in the queue
    this.ends = 0; // end markers in the queue
    this.played = new Map(); // turn -> samples played, all its segments
    this.current = null; // turn playing now
    this.primed = false;
    this.prime = Math.round((sampleRate * PRIME_MS) / 1000);
    this.reportEvery = Math.round((sampleRate * REPORT_MS) / 1000);
    this.sinceReport = 0;
    this.fade = 0; // samples of fade-out left (then the queue is dropped)
    this.fadeLen = Math.round((sampleRate * FADE_MS) / 1000);
    this.underruns = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (this.fade > 0) return; // stopping: nothing new until the fade is over
    if (msg.type === "audio") {
      this.queue.push({ turn: msg.turn, data: msg.samples, off: 0 });
      this.queued += msg.samples.length;
      if (!this.played.has(msg.turn)) this.played.set(msg.turn, 0);
      if (this.played.size > 64) this.played.delete(this.played.keys().next().value);
    } else if (msg.type === "end") {
      this.queue.push({ turn: msg.turn, end: true });
      this.ends++;
    } else if (msg.type === "stop") {
      // Stop at once: a 4 ms fade of what is playing, then drop everything.
      if (this.queued > 0 && this.primed) this.fade = Math.min(this.fadeLen, this.queued);
      else this.dropAll();
    }
  }

  report(type, turn) {
    this.port.postMessage({ type, turn, samples: this.played.get(turn) || 0, underruns: this.underruns });
  }

  dropAll() {
    const turns = new Set(this.queue.map((q) => q.turn));
    if (this.current !== null) turns.add(this.current);
    this.queue = [];
    this.queued = 0;
    this.ends = 0;
    this.primed = false;
    this.fade = 0;
    this.current = null;
    this.sinceReport = 0;
    for (const t of turns) this.report("stopped", t);
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    const n = out.length;
    out.fill(0);
    let i = 0;
    while (i < n && this.queue.length) {
      if (!this.primed) {
        if (this.queued < this.prime && this.ends === 0) break;
        this.primed = true;
      }
      const q = this.queue[0];
      if (q.end) {
        // The segment is over: report it, and prime again for the next one.
        this.queue.shift();
        this.ends--;
        this.report("done", q.turn);
        this.current = null;
        this.sinceReport = 0;
        this.primed = false;
        continue;
      }
      this.current = q.turn;
      if (!this.played.get(q.turn)) {
        this.port.postMessage({ type: "started", turn: q.turn, ctxTime: currentTime + i / sampleRate });
      }
      const fading = this.fade > 0;
      const take = Math.min(n - i, q.data.length - q.off, fading ? this.fade : Infinity);
      for (let k = 0; k < take; k++) {
        let s = q.data[q.off + k];
        if (fading) s *= (this.fade - k) / this.fadeLen;
        out[i + k] = s;
      }
      q.off += take;
      i += take;
      this.queued -= take;
      this.played.set(q.turn, (this.played.get(q.turn) || 0) + take);
      this.sinceReport += take;
      if (q.off >= q.data.length) this.queue.shift();
      if (fading) {
        this.fade -= take;
        if (this.fade <= 0) {
          this.dropAll();
          return true;
        }
      }
    }
    if (this.primed && !this.queue.length && this.current !== null) {
      // Underrun in the middle of a segment: wait for PRIME_MS again.
      this.primed = false;
      this.underruns++;
      this.sinceReport = 0;
      this.report("underrun", this.current);
    }
    if (this.current !== null && this.sinceReport >= this.reportEvery) {
      this.sinceReport = 0;
      this.report("position", this.current);
    }
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
registerProcessor("playback", PlaybackProcessor);
