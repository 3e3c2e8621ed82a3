'use strict';
// A stand-in for api-blast built on Node's own http server (no npm packages), so tests can talk
// to a real Node keep-alive implementation: its idle connections close after
// server.keepAliveTimeout (5 s by default, KEEPALIVE_MS to change it), the race a proxy must
// survive. It answers like api-blast: HTTP 200 with the success shape, urlencoded bodies only.
//
// Usage: node tests/node_upstream.js [PORT]   (0 or nothing = a free port)
// Prints "node upstream listening on http://127.0.0.1:PORT" once bound; exits on SIGTERM.

const http = require('http');
const crypto = require('crypto');

const sent = [];
// About 60 KB of JSON, as api-blast's GET /get_qrcode answers.
const QR_PNG = 'data:image/png;base64,' + crypto.randomBytes(45000).toString('base64');
const calls = {};

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
  });
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

// Like Express's urlencoded() middleware: any other content type leaves the fields empty.
function formFields(req, text) {
  const type = (req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  if (type !== 'application/x-www-form-urlencoded') return new URLSearchParams();
  return new URLSearchParams(text);
}

function authorized(url) {
  return Boolean(url.searchParams.get('instance_id')) && Boolean(url.searchParams.get('access_token'));
}

async function sendMessage(req, res, url) {
  const fields = formFields(req, await readBody(req));
  if (!authorized(url)) {
    return reply(res, 200, { status: 'error', message: 'Instance ID Invalidated' });
  }
  const chatId = fields.get('chat_id');
  if (!chatId) {
    return reply(res, 200, { status: 'error', message: 'Cannot read properties of undefined (chat_id)' });
  }
  const caption = fields.get('caption') || '';
  const id = '3EB0' + crypto.randomBytes(9).toString('hex').toUpperCase();
  const now = Date.now() / 1000;
  sent.push({ instance_id: url.searchParams.get('instance_id'), chat_id: chatId, caption, id, t: now });
  return reply(res, 200, {
    status: 'success',
    message: {
      key: { remoteJid: chatId, fromMe: true, id },
      message: { extendedTextMessage: { text: caption } },
      messageTimestamp: String(Math.floor(now)),
      status: 'PENDING',
    },
  });
}

async function route(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  const key = `${req.method} ${url.pathname}`;
  calls[key] = (calls[key] || 0) + 1;
  switch (key) {
    case 'GET /':
      return reply(res, 200, { status: 'success', message: 'WAZIPER IS LIVE' });
    case 'GET /instance':
      if (!authorized(url)) return reply(res, 200, { status: 'error', message: 'Instance ID Invalidated' });
      return reply(res, 200, {
        status: 'success',
        message: 'Success',
        data: { id: '6281234567890:21@s.whatsapp.net', name: 'Node upstream', lid: '210987654321098:21@lid' },
      });
    case 'GET /get_qrcode':
      // A QR code answer is a base64 PNG: tens of KB.
      if (!authorized(url)) return reply(res, 200, { status: 'error', message: 'Instance ID Invalidated' });
      return reply(res, 200, { status: 'success', message: 'Success', base64: QR_PNG });
    case 'POST /send_message':
      return sendMessage(req, res, url);
    case 'GET /_sim/sent':
      return reply(res, 200, { sent });
    case 'GET /_sim/stats':
      return reply(res, 200, { calls, sent: sent.length });
    case 'POST /_sim/reset_sent':
      sent.length = 0;
      return reply(res, 200, { ok: true });
    default:
      return reply(res, 404, { status: 'error', message: `Cannot ${req.method} ${url.pathname}` });
  }
}

const server = http.createServer((req, res) => {
  route(req, res).catch((err) => reply(res, 500, { status: 'error', message: String(err) }));
});

if (process.env.KEEPALIVE_MS) {
  server.keepAliveTimeout = Number(process.env.KEEPALIVE_MS);
}

process.on('SIGTERM', () => process.exit(0));

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`node upstream listening on http://127.0.0.1:${server.address().port}`);
});
