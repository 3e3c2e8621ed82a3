'use strict';
// A Node upstream for tests/test_relay.py: answers shaped to exercise the pass-through relay
// (chunked, HEAD/204/304, Connection: close, slow answers, dropped connections, big bodies).
// Every answer names the upstream socket it came over (X-Socket), so tests see connection reuse.
//
// Usage: node tests/relay_upstream.js   Prints "relay upstream listening on http://127.0.0.1:PORT".

const http = require('http');
const crypto = require('crypto');

let nextSocket = 0;
let connections = 0;
const calls = {};

function json(res, status, body, headers) {
  const text = JSON.stringify(body);
  res.writeHead(status, Object.assign({
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
  }, headers || {}));
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  const path = url.pathname;
  calls[`${req.method} ${path}`] = (calls[`${req.method} ${path}`] || 0) + 1;
  res.setHeader('X-Socket', String(req.socket.relayId));
  switch (path) {
    case '/echo': {
      const body = await readBody(req);
      return json(res, 200, {
        method: req.method, url: req.url, headers: req.rawHeaders,
        body: body.toString('latin1'),
      });
    }
    case '/chunked':
      res.writeHead(200, { 'Content-Type': 'text/plain' });
      res.write('first,');
      setTimeout(() => { res.write('second,'); res.end('third'); }, 20);
      return undefined;
    case '/status': {
      const code = Number(url.searchParams.get('code'));
      res.writeHead(code, { 'Content-Length': '5', ETag: '"x"' });
      return res.end();
    }
    case '/close':
      return json(res, 200, { closing: true }, { Connection: 'close' });
    case '/hop':
      return json(res, 200, { ok: true }, {
        Connection: 'X-Resp-Hop', 'X-Resp-Hop': 'drop me', 'Keep-Alive': 'timeout=5',
        'X-Resp-Kept': 'keep me',
      });
    case '/slow':
      setTimeout(() => json(res, 200, { slow: true }), Number(url.searchParams.get('ms')));
      return undefined;
    case '/destroy': {
      // Closes the connection without answering (a pooled connection dying as it is reused).
      await readBody(req);
      return req.socket.destroy();
    }
    case '/sink': {
      const hash = crypto.createHash('sha256');
      let size = 0;
      req.on('data', (chunk) => { size += chunk.length; hash.update(chunk); });
      req.on('end', () => json(res, 200, { size, sha256: hash.digest('hex') }));
      return undefined;
    }
    case '/instance': {
      // api-blast's GET /instance answer (token accepted), framed as ?frame= asks:
      // length, chunked, cut (the connection dies in the middle), big (over 64 KB).
      const frame = url.searchParams.get('frame') || 'length';
      const doc = {
        status: 'success', message: 'Success',
        data: { id: url.searchParams.get('jid'), name: 'Relay test', lid: '1:1@lid' },
      };
      if (frame === 'big') doc.data.avatar = 'x'.repeat(70000);
      const text = JSON.stringify(doc);
      if (frame === 'chunked') {
        res.writeHead(200, { 'Content-Type': 'application/json; charset=utf-8' });
        res.write(text.slice(0, 20));
        setTimeout(() => res.end(text.slice(20)), 10);
        return undefined;
      }
      res.writeHead(200, { 'Content-Type': 'application/json; charset=utf-8',
        'Content-Length': Buffer.byteLength(text) });
      if (frame === 'cut') {
        res.write(text.slice(0, 30));
        setTimeout(() => req.socket.destroy(), 20);
        return undefined;
      }
      return res.end(text);
    }
    case '/cut': {
      // Declares 100,000 bytes, sends 1,000, then the connection dies (api-blast killed
      // in the middle of an answer).
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': 100000 });
      res.write(Buffer.alloc(1000, 'x'));
      setTimeout(() => req.socket.destroy(), 50);
      return undefined;
    }
    case '/big': {
      const total = Number(url.searchParams.get('n'));
      const block = Buffer.alloc(65536, 'abcdefghijklmnop');
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': total });
      let left = total;
      const pump = () => {
        while (left > 0) {
          const piece = left >= block.length ? block : block.subarray(0, left);
          left -= piece.length;
          if (!res.write(piece)) return res.once('drain', pump);
        }
        return res.end();
      };
      return pump();
    }
    case '/send_message':  // api-blast's success shape, for a guarded send sent inline
      await readBody(req);
      return json(res, 200, {
        status: 'success',
        message: { key: { remoteJid: '1@c.us', fromMe: true, id: '3EB0RELAY' }, status: 'PENDING' },
      });
    case '/_stats':
      return json(res, 200, { calls, connections });
    default:
      return json(res, 404, { status: 'error', message: `Cannot ${req.method} ${path}` });
  }
});

server.on('connection', (socket) => {
  connections += 1;
  nextSocket += 1;
  socket.relayId = nextSocket;
});

process.on('SIGTERM', () => process.exit(0));

server.listen(0, '127.0.0.1', () => {
  console.log(`relay upstream listening on http://127.0.0.1:${server.address().port}`);
});
