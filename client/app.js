// xportrait page: webcam -> WebRTC -> server -> animated portrait back, with live stats.
// Signalling as in aiortc's examples: gather ICE candidates, POST the offer, apply the answer.
'use strict';

const $ = (id) => document.getElementById(id);
let token = new URLSearchParams(location.search).get('token');
const authHeaders = () => (token ? { Authorization: `Bearer ${token}` } : {});

// What the page knows; tests read it through window.xportrait.
const state = {
  status: 'idle',
  session: null,
  secret: null, // controls our session (from the offer's answer); never shown
  portrait: null,
  avatarFrames: 0, // avatar frames painted on screen
  stats: null, // the server's latest stats message
  error: null,
  glassToGlass: null, // camera-to-screen ms, p50 of the last frames; null: not measurable here (n/a)
};
window.xportrait = state;

let pc = null;
let channel = null;
let camera = null;
let pendingUpload = null; // a file chosen before the stream started

function setStatus(text, isError = false) {
  state.status = text;
  if (isError) state.error = text;
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
}

function setUploadStatus(text, isError = false) {
  $('upload-status').textContent = text;
  $('upload-status').classList.toggle('error', isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error) return `${response.status}: ${body.error}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// ---- access token: asked for in words when the server wants one -----------------------------------
function askForToken() {
  const url = new URL(location.href);
  url.searchParams.set('token', 'TOKEN');
  $('token-url').textContent = url.href.replace('TOKEN', '…');
  $('token-form').hidden = false;
  $('token').focus();
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  token = $('token').value.trim();
  if (!token) return;
  const url = new URL(location.href);
  url.searchParams.set('token', token);
  history.replaceState(null, '', url); // a reload keeps it
  $('token-form').hidden = true;
  start();
});

// ---- the camera: browsers give it only to secure pages -------------------------------------------
function cameraUnavailable() {
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) return null;
  const here = `${location.protocol}//${location.host}`;
  if (!window.isSecureContext) {
    return `This browser gives the camera only to pages served over HTTPS or from this machine ` +
      `(localhost), and this page is ${here}. Start the server with --self-signed (or --tls-cert and ` +
      `--tls-key) and open https://${location.host}/; or serve on 127.0.0.1 with --tunnel and reach it ` +
      `through SSH: ssh -L ${location.port || 8080}:127.0.0.1:${location.port || 8080} SERVER, then open ` +
      `http://127.0.0.1:${location.port || 8080}/.`;
  }
  return 'This browser has no camera API (navigator.mediaDevices): use a current Chromium, Firefox or Safari.';
}

function cameraError(e) {
  const reasons = {
    NotAllowedError: 'camera permission was denied: allow the camera for this page (the icon in the address bar) and press Start again',
    NotFoundError: 'no camera was found: connect one and press Start again',
    NotReadableError: 'the camera is in use by another program, or cannot be opened',
    OverconstrainedError: 'the camera cannot deliver a usable video size',
    SecurityError: 'the browser does not allow the camera on this page',
  };
  return reasons[e.name] || `the camera could not be opened (${e.message || e.name})`;
}

// ---- gallery and uploads ------------------------------------------------------------------------
async function loadGallery() {
  const response = await fetch('portraits');
  const portraits = await response.json();
  const gallery = $('gallery');
  for (const { name, thumbnail } of portraits) {
    const button = document.createElement('button');
    button.title = name;
    button.dataset.name = name;
    const img = document.createElement('img');
    img.src = thumbnail;
    img.alt = name;
    button.append(img);
    button.addEventListener('click', () => choosePortrait(name));
    gallery.append(button);
  }
  if (portraits.length) markPortrait(portraits[0].name);
}

function markPortrait(name) {
  state.portrait = name;
  for (const button of $('gallery').children) {
    button.setAttribute('aria-pressed', String(button.dataset.name === name));
  }
}

async function postAvatar(query, body, headers = {}) {
  const url = `avatar?session=${encodeURIComponent(state.session)}&${query}`;
  const response = await fetch(url, {
    method: 'POST', body, headers: { ...authHeaders(), 'X-Session-Secret': state.secret, ...headers },
  });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function choosePortrait(name) {
  if (!state.session) { markPortrait(name); return; }
  try {
    await postAvatar(`portrait=${encodeURIComponent(name)}`);
    markPortrait(name);
    setUploadStatus('');
  } catch (e) {
    setUploadStatus(e.message, true);
  }
}

async function uploadPortrait(file) {
  if (!state.session || !streaming()) { // the server takes uploads once our video reaches it
    pendingUpload = file;
    setUploadStatus(`${file.name} will be used when the stream starts`);
    return;
  }
  setUploadStatus(`uploading ${file.name}...`);
  try {
    const result = await postAvatar('', file, { 'Content-Type': file.type || 'application/octet-stream' });
    markPortrait(null);
    setUploadStatus(`${file.name} (${result.width}x${result.height})`);
  } catch (e) {
    setUploadStatus(e.message, true);
  }
}

// ---- stats overlay ---------------------------------------------------------------------------------
const streaming = () => Boolean(state.stats && state.stats.frames_in > 0);

function showStats(stats) {
  state.stats = stats;
  const latency = stats.latency_ms;
  const ms = (v) => (v === null || v === undefined ? '-' : v.toFixed(1));
  const stage = (names) => names.map((k) => `${k} ${ms(stats.stages_ms[k])}`).join('  ');
  $('overlay').textContent =
    `fps ${stats.fps_out.toFixed(1)} (camera ${stats.fps_in.toFixed(1)})\n` +
    `latency p50 ${ms(latency.p50)} ms  p95 ${ms(latency.p95)} ms\n` +
    `glass-to-glass ${glassText()}\n` +
    qualityText(stats) +
    `drops ${stats.dropped}  no face ${stats.frames_without_face}\n` +
    `ms: ${stage(['wait', 'convert_in', 'face'])}\n` +
    `    ${stage(['wait_engine', 'engine'])}\n` +
    `    ${stage(['convert_out', 'encode_send'])}`;
  if (pendingUpload && streaming()) {
    const file = pendingUpload;
    pendingUpload = null;
    uploadPortrait(file);
  }
}

// The quality governor's level, its target and why it moved (serve --target-fps /
// --max-latency-ms), and a line while some of the engine's levels are not made yet.
function qualityText(stats) {
  const q = stats.quality;
  if (!q) return '';
  const target = [q.target_fps && `${q.target_fps} fps`, q.max_latency_ms && `latency ${q.max_latency_ms} ms`]
    .filter(Boolean).join(', ');
  return `quality ${q.name} (${q.level + 1}/${q.levels.length})  target ${target}  ${q.reason}\n` + levelsText(q);
}

// Which level is made now, which the governor waits for, and when the others will be made: a
// cheaper one when the governor needs it, a better one only once no session streams (making it
// would slow this one: streamer/governor.py's LevelMaker), and which could not be made (the
// governor passes over those). Nothing once every level is made.
function levelsText(q) {
  const made = q.ready ? q.ready.filter(Boolean).length : q.levels.length;
  const failed = q.levels.filter((_, i) => q.failed && q.failed[i]);
  if (made === q.levels.length) return '';
  const waiting = q.levels.indexOf(q.waiting_for);
  const left = q.levels.map((_, i) => i)
    .filter((i) => !q.ready[i] && !(q.failed && q.failed[i]) && q.levels[i] !== q.making);
  const better = left.filter((i) => i < q.level && i !== waiting).length;
  const cheaper = left.filter((i) => i > q.level && i !== waiting).length;
  const parts = [];
  if (q.making) parts.push(`making ${q.making}${q.making === q.waiting_for ? ' (the governor waits for it)' : ''}`);
  if (waiting >= 0 && q.waiting_for !== q.making) {
    parts.push(waiting > q.level ? `${q.waiting_for} next (the governor waits for it)`
      : `${q.waiting_for} would fit: made once no session streams`);
  }
  if (better) parts.push('better once no session streams');
  if (cheaper) parts.push('cheaper when needed');
  if (failed.length) parts.push(`${failed.join(', ')} could not be made (passed over; the server log says why)`);
  return `levels made ${made}/${q.levels.length}: ${parts.join('; ')}\n`;
}

// ---- glass-to-glass: camera capture to the avatar frame on screen ------------------------------
// The server's capture clock (streamer/glass.py) takes an avatar frame's RTP timestamp to the
// moment the browser captured the camera frame it was made from; that moment must be one of our
// own camera video's frame capture times (requestVideoFrameCallback), or nothing is shown.
const cameraCaptures = []; // unix ms of the camera video's recent frames
const glassSamples = [];
const CAMERA_FRAMES_KEPT = 300;
const GLASS_SAMPLES_KEPT = 60;
const CAPTURE_MATCH_MS = 8; // a capture moment within this of a camera frame's is that frame

function glassText() {
  return state.glassToGlass === null ? 'n/a' : `p50 ${state.glassToGlass.toFixed(1)} ms`;
}

function watchCameraCaptures(video) {
  if (!('requestVideoFrameCallback' in HTMLVideoElement.prototype)) return;
  const onFrame = (now, metadata) => {
    if (metadata.captureTime !== undefined) {
      cameraCaptures.push(performance.timeOrigin + metadata.captureTime);
      if (cameraCaptures.length > CAMERA_FRAMES_KEPT) cameraCaptures.shift();
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function glassSample(metadata) {
  const clock = state.stats && state.stats.capture_clock;
  if (!clock || metadata.rtpTimestamp === undefined || !cameraCaptures.length) return;
  const delta = ((metadata.rtpTimestamp - clock.rtp) | 0) / 90; // RTP ticks wrap at 2^32
  const capture = clock.unix_ms + delta;
  let nearest = cameraCaptures[0];
  for (const t of cameraCaptures) if (Math.abs(t - capture) < Math.abs(nearest - capture)) nearest = t;
  if (Math.abs(nearest - capture) > CAPTURE_MATCH_MS) return; // not one of our frames: clocks disagree
  const shown = performance.timeOrigin + metadata.expectedDisplayTime;
  glassSamples.push(shown - nearest);
  if (glassSamples.length > GLASS_SAMPLES_KEPT) glassSamples.shift();
  const sorted = [...glassSamples].sort((a, b) => a - b);
  state.glassToGlass = sorted.length >= 5 ? sorted[Math.floor(sorted.length / 2)] : null;
}

function countAvatarFrames(video) {
  if (!('requestVideoFrameCallback' in HTMLVideoElement.prototype)) {
    video.addEventListener('timeupdate', () => { state.avatarFrames += 1; });
    return;
  }
  const onFrame = (now, metadata) => {
    state.avatarFrames += 1;
    glassSample(metadata);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

// ---- serving on Ray workers: ICE servers, and why a session ended ----------------------------------
async function iceServers() { // the server's --ice-server list (STUN/TURN); none from an older server
  try {
    const response = await fetch('ice-servers', { headers: authHeaders() });
    return response.ok ? await response.json() : [];
  } catch (e) {
    return [];
  }
}

function sessionEnded(reason) {
  setStatus(`the stream ended: ${reason}`, true);
  stop(false);
}

// The peer stopped answering: on Ray workers (serve --workers) the front knows when the
// session's worker died, and says why (410); elsewhere the plain "connection failed" stands.
async function askWhyTheConnectionDropped() {
  const { session, secret } = state;
  if (!session) return false;
  try {
    const response = await fetch(`session?session=${encodeURIComponent(session)}`,
      { headers: { ...authHeaders(), 'X-Session-Secret': secret } });
    if (response.status !== 410 || state.session !== session) return false;
    sessionEnded((await response.json()).error);
    return true;
  } catch (e) {
    return false;
  }
}

// ---- the stream ------------------------------------------------------------------------------------
function iceGatheringComplete(connection) {
  if (connection.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (connection.iceGatheringState === 'complete') {
        connection.removeEventListener('icegatheringstatechange', check);
        resolve();
      }
    };
    connection.addEventListener('icegatheringstatechange', check);
  });
}

async function start() {
  $('start').disabled = true;
  state.error = null;
  const unavailable = cameraUnavailable();
  if (unavailable) {
    $('camera-help').textContent = unavailable;
    $('camera-help').hidden = false;
    setStatus('no camera on this page: see above', true);
    $('start').disabled = false;
    return;
  }
  setStatus('opening the camera...');
  try {
    camera = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
      audio: false,
    });
  } catch (e) {
    setStatus(cameraError(e), true);
    $('start').disabled = false;
    return;
  }
  $('camera').srcObject = camera;

  pc = new RTCPeerConnection({ iceServers: await iceServers() });
  for (const track of camera.getVideoTracks()) pc.addTrack(track, camera);
  pc.addEventListener('track', (event) => {
    $('avatar').srcObject = event.streams[0] || new MediaStream([event.track]);
  });
  pc.addEventListener('connectionstatechange', () => {
    if (!pc) return;
    if (pc.connectionState === 'connected') setStatus('streaming');
    if (pc.connectionState === 'disconnected') askWhyTheConnectionDropped();
    if (pc.connectionState === 'failed') {
      askWhyTheConnectionDropped().then((told) => { if (!told && pc) { setStatus('connection failed', true); stop(false); } });
    }
  });
  channel = pc.createDataChannel('stats');
  channel.addEventListener('message', (event) => {
    const message = JSON.parse(event.data);
    if (message.type === 'stats') showStats(message);
    if (message.type === 'ended') sessionEnded(message.reason); // a worker shutting down says why
  });
  channel.addEventListener('open', sendRetargeting); // the controls this browser keeps
  channel.addEventListener('message', onRetargetReply);

  setStatus('connecting...');
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    const response = await fetch('offer', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', ...authHeaders() },
      body: JSON.stringify({
        sdp: pc.localDescription.sdp,
        type: pc.localDescription.type,
        mode: $('echo').checked ? 'echo' : 'animate',
        portrait: state.portrait || undefined,
      }),
    });
    if (response.status === 401) {
      stop(false);
      setStatus('this server needs an access token', true);
      askForToken();
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const answer = await response.json();
    state.session = answer.session;
    state.secret = answer.secret;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  } catch (e) {
    setStatus(`could not start: ${e.message}`, true);
    stop(false);
    return;
  }
  $('stop').disabled = false;
  $('recalibrate').disabled = $('echo').checked;
}

function stop(resetStatus = true) {
  if (pc) pc.close();
  pc = null;
  channel = null;
  if (camera) camera.getTracks().forEach((track) => track.stop());
  camera = null;
  state.session = state.secret = state.stats = state.glassToGlass = null;
  cameraCaptures.length = glassSamples.length = 0;
  $('camera').srcObject = null;
  $('avatar').srcObject = null;
  $('overlay').textContent = 'no stream';
  $('start').disabled = false;
  $('stop').disabled = true;
  $('recalibrate').disabled = true;
  if (resetStatus) setStatus('idle');
}

// ---- retargeting controls: sent on the data channel, kept in this browser (localStorage) -----------
const RETARGET_KEY = 'xportrait.retargeting';
const RETARGET_SLIDERS = ['expression', 'head_pose', 'mouth_open'];

function savedRetargeting() {
  const settings = { expression: 1, head_pose: 1, mouth_open: 1, eyes: 'follow' };
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(RETARGET_KEY)) || {}; } catch (e) { /* none, or not ours */ }
  for (const name of RETARGET_SLIDERS) {
    const slider = $(`rt-${name}`);
    const value = Number(saved[name]);
    if (Number.isFinite(value) && value >= Number(slider.min) && value <= Number(slider.max)) settings[name] = value;
  }
  if (saved.eyes === 'open') settings.eyes = 'open';
  return settings;
}

function showRetargeting() {
  for (const name of RETARGET_SLIDERS) {
    $(`rt-${name}`).value = state.retargeting[name];
    $(`rt-${name}-value`).textContent = Number(state.retargeting[name]).toFixed(2);
  }
  $('rt-eyes-open').checked = state.retargeting.eyes === 'open';
}

// At most one message per RETARGET_SEND_MS while a slider is dragged, and always the last value
// (the server ignores commands past its rate: a drag on a 120 Hz screen would lose its end).
const RETARGET_SEND_MS = 40;
let retargetSentAt = -Infinity;
let retargetPending = null;
function sendRetargeting() {
  const wait = retargetSentAt + RETARGET_SEND_MS - performance.now();
  if (wait > 0) {
    if (retargetPending === null) retargetPending = setTimeout(() => { retargetPending = null; sendRetargeting(); }, wait);
    return;
  }
  if (channel && channel.readyState === 'open' && !$('echo').checked) {
    retargetSentAt = performance.now();
    channel.send(JSON.stringify({ type: 'retarget', ...state.retargeting }));
  }
}

function setRetargeting(changes) {
  state.retargeting = { ...state.retargeting, ...changes };
  try { localStorage.setItem(RETARGET_KEY, JSON.stringify(state.retargeting)); } catch (e) { /* private mode */ }
  showRetargeting();
  sendRetargeting();
}

function onRetargetReply(event) {
  const message = JSON.parse(event.data);
  if (message.type === 'retargeting') {
    state.retargetingApplied = message;
    $('rt-status').textContent = '';
    $('rt-status').classList.remove('error');
  } else if (message.type === 'error' && message.command === 'retarget') {
    $('rt-status').textContent = message.message;
    $('rt-status').classList.add('error');
  }
}

state.retargeting = savedRetargeting();
state.retargetingApplied = null; // the values the server last confirmed
showRetargeting();
for (const name of RETARGET_SLIDERS) {
  $(`rt-${name}`).addEventListener('input', (event) => setRetargeting({ [name]: Number(event.target.value) }));
}
$('rt-eyes-open').addEventListener('change', (event) => setRetargeting({ eyes: event.target.checked ? 'open' : 'follow' }));
$('rt-reset').addEventListener('click', () => setRetargeting({ expression: 1, head_pose: 1, mouth_open: 1, eyes: 'follow' }));

$('start').addEventListener('click', start);
$('stop').addEventListener('click', () => stop());
$('recalibrate').addEventListener('click', () => {
  if (channel && channel.readyState === 'open') channel.send(JSON.stringify({ type: 'recalibrate' }));
});
$('upload').addEventListener('change', (event) => {
  const file = event.target.files[0];
  if (file) uploadPortrait(file);
  event.target.value = '';
});
countAvatarFrames($('avatar'));
watchCameraCaptures($('camera'));
loadGallery().catch((e) => setStatus(`could not load portraits: ${e.message}`, true));
