// Cross-organisation isolation through the official JavaScript SDK
// (@fly/sprites), run by the Rust test `sdk_isolation`
// (tests/api/sdk_isolation.rs); see tests/sdk/test_isolation_py.py for the
// sprites it sets up. Every refusal is compared with what a sprite that does
// not exist answers: the same error, the same message but for the name.

import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { test } from 'node:test';

const { SpritesClient, APIError } = await import(process.env.DEN_SPRITES_JS);

const URL_ = process.env.DEN_TEST_URL;
const TOKEN_A = process.env.DEN_TOKEN_A;
const TOKEN_RESTRICTED = process.env.DEN_TOKEN_RESTRICTED;
const TOKEN_VIEWER = process.env.DEN_TOKEN_VIEWER;
// name=url-label of each sprite outside org A's reach.
const VICTIMS = Object.fromEntries(process.env.DEN_VICTIMS.split(',').map((p) => p.split('=')));
const MISSING = 'nosuch';
const a = new SpritesClient(TOKEN_A, { baseURL: URL_ });
const api = new URL(URL_);

function statusOf(e) {
  if (e?.statusCode) return e.statusCode;
  const m = /status[ =:]*(\d{3})/.exec(String(e?.message ?? e));
  return m ? Number(m[1]) : undefined;
}

function looksNotFound(e) {
  const s = statusOf(e);
  return s !== undefined ? s === 404 : /not[ _]found/i.test(String(e?.message ?? e));
}

async function failure(op, name) {
  try {
    const r = await op(name);
    if (r && typeof r.processAll === 'function') await r.processAll(() => {});
  } catch (e) {
    return e;
  }
  throw new Error(`${op} on ${name} succeeded`);
}

// op(name) fails for each victim exactly as for a sprite that does not exist.
async function failsLikeMissing(op, { victims = Object.keys(VICTIMS), notFound = true } = {}) {
  for (const victim of victims) {
    const v = await failure(op, victim);
    const m = await failure(op, MISSING);
    assert.equal(v.constructor, m.constructor, `${victim}: ${v}; missing: ${m}`);
    assert.equal(
      String(v.message).replaceAll(victim, '<NAME>'),
      String(m.message).replaceAll(MISSING, '<NAME>'),
    );
    if (notFound) assert.ok(looksNotFound(v), `${victim}: not a not-found: ${v}`);
  }
}

// A raw request to the server: status and body. `host` makes it a sprite URL request.
function request(method, path, { token, host, upgrade } = {}) {
  const headers = {};
  if (token) headers.authorization = `Bearer ${token}`;
  if (host) headers.host = host;
  if (upgrade) {
    Object.assign(headers, {
      connection: 'Upgrade',
      upgrade: 'websocket',
      'sec-websocket-version': '13',
      'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==',
    });
  }
  return new Promise((resolve, reject) => {
    const req = http.request({ host: api.hostname, port: api.port, method, path, headers }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode, body }));
    });
    req.on('upgrade', (res, socket) => {
      socket.destroy();
      resolve({ status: res.statusCode, body: '' });
    });
    req.on('error', reject);
    req.end();
  });
}

async function rawLikeMissing(method, path, opts = {}) {
  for (const victim of opts.victims ?? Object.keys(VICTIMS)) {
    const v = await request(method, path.replace('{name}', victim), { token: TOKEN_A, ...opts });
    const m = await request(method, path.replace('{name}', MISSING), { token: TOKEN_A, ...opts });
    assert.equal(v.status, 404, `${method} ${path} ${victim}: ${v.status} ${v.body}`);
    assert.equal(v.body.replaceAll(victim, '<NAME>'), m.body.replaceAll(MISSING, '<NAME>'));
    assert.deepEqual(JSON.parse(v.body), { error: 'not_found', message: `sprite not found: ${victim}` });
  }
}

async function freePort() {
  return new Promise((resolve) => {
    const l = net.createServer();
    l.listen(0, '127.0.0.1', () => {
      const p = l.address().port;
      l.close(() => resolve(p));
    });
  });
}

// What a local connection through the SDK's port forward receives before it closes.
async function throughProxy(client, name) {
  const port = await freePort();
  const session = await client.sprite(name).proxyPort(port, 8080);
  session.on('error', () => {});
  try {
    return await new Promise((resolve) => {
      const c = net.connect(port, '127.0.0.1');
      let data = '';
      c.on('connect', () => c.write('GET / HTTP/1.0\r\n\r\n'));
      c.on('data', (d) => (data += d));
      c.on('close', () => resolve(data));
      c.on('error', () => resolve(data));
    });
  } finally {
    session.close();
  }
}

test('control: org A works on its own sprite', async () => {
  const r = await a.sprite('mine').execFile('echo', ['mine']);
  assert.equal(r.stdout, 'mine\n');
  assert.equal((await a.getSprite('mine')).name, 'mine');
});

test('lists show only org A', async () => {
  assert.deepEqual((await a.listAllSprites()).map((s) => s.name), ['mine']);
  for (const victim of Object.keys(VICTIMS)) {
    assert.deepEqual(await a.listAllSprites(victim.slice(0, 3)), []);
  }
  const page = await a.listSprites();
  assert.deepEqual(page.sprites.map((s) => s.name), ['mine']);
});

test('get', async () => {
  await failsLikeMissing((n) => a.getSprite(n));
});

test('exec over WebSocket and HTTP, sessions', async () => {
  // This SDK's WebSocket error carries no status: the raw upgrade below checks it.
  await failsLikeMissing((n) => a.sprite(n).execFile('cat', ['/home/sprite/note.txt']), { notFound: false });
  await failsLikeMissing((n) => a.sprite(n).execFileHTTP('rm', ['-f', '/home/sprite/note.txt']));
  await failsLikeMissing((n) => a.sprite(n).listSessions());
  await failsLikeMissing((n) => a.sprite(n).killSession('1', 'KILL'));
  await rawLikeMissing('GET', '/v1/sprites/{name}/exec?cmd=id', { upgrade: true });
});

test('filesystem', async () => {
  const fs = (n) => a.sprite(n).filesystem('/home/sprite');
  await failsLikeMissing((n) => fs(n).readFile('note.txt', 'utf8'));
  await failsLikeMissing((n) => fs(n).writeFile('note.txt', 'pwned'));
  await failsLikeMissing((n) => fs(n).readdir('.'));
  await failsLikeMissing((n) => fs(n).rm('note.txt'));
  await failsLikeMissing((n) => fs(n).rename('note.txt', 'moved.txt'));
  await failsLikeMissing((n) => fs(n).chmod('note.txt', 0o777));
});

test('port forwarding carries nothing', async () => {
  for (const victim of Object.keys(VICTIMS)) {
    assert.equal(await throughProxy(a, victim), '', victim);
  }
  await rawLikeMissing('GET', '/v1/sprites/{name}/proxy', { upgrade: true });
});

test('services', async () => {
  await failsLikeMissing((n) => a.sprite(n).listServices());
  await failsLikeMissing((n) => a.sprite(n).getService('web'));
  await failsLikeMissing((n) => a.sprite(n).deleteService('web'));
  await failsLikeMissing((n) => a.sprite(n).stopService('web'));
  await failsLikeMissing((n) => a.sprite(n).createService('evil', { cmd: 'sh', args: ['-c', 'rm -rf /home/sprite'] }));
  await failsLikeMissing((n) => a.sprite(n).getServiceLogs('web'));
  await rawLikeMissing('GET', '/v1/sprites/{name}/services/web/logs');
});

test('checkpoints', async () => {
  await failsLikeMissing((n) => a.sprite(n).listCheckpoints());
  await failsLikeMissing((n) => a.sprite(n).getCheckpoint('v1'));
  await failsLikeMissing((n) => a.sprite(n).createCheckpoint('evil'));
  await failsLikeMissing((n) => a.sprite(n).restoreCheckpoint('v1'));
});

test('settings, policy, delete', async () => {
  await failsLikeMissing((n) => a.updateSprite(n, { urlSettings: { auth: 'public' } }));
  await failsLikeMissing((n) => a.sprite(n).getNetworkPolicy());
  await failsLikeMissing((n) => a.sprite(n).updateNetworkPolicy({ rules: [{ domain: '*', action: 'deny' }] }));
  await failsLikeMissing((n) => a.deleteSprite(n));
});

test('sprite URLs with org A token', async () => {
  for (const [victim, label] of Object.entries(VICTIMS)) {
    const v = await request('GET', '/', { token: TOKEN_A, host: `${label}.localhost:${api.port}` });
    const m = await request('GET', '/', {
      token: TOKEN_A,
      host: `${label.replace(victim, MISSING)}.localhost:${api.port}`,
    });
    assert.equal(v.status, 404, `${label}: ${v.status} ${v.body}`);
    assert.equal(v.body.replaceAll(victim, '<NAME>'), m.body.replaceAll(MISSING, '<NAME>'));
  }
});

test('a sprites-restricted token sees only its sprite', async () => {
  const r = new SpritesClient(TOKEN_RESTRICTED, { baseURL: URL_ });
  assert.deepEqual((await r.listAllSprites()).map((s) => s.name), ['secret']);
  assert.equal((await r.getSprite('secret')).name, 'secret');
  assert.equal((await r.sprite('secret').execFile('cat', ['/home/sprite/note.txt'])).stdout, 'after\n');
  await failsLikeMissing((n) => r.getSprite(n), { victims: ['other'] });
  await failsLikeMissing((n) => r.sprite(n).execFile('id'), { victims: ['other'], notFound: false });
  await rawLikeMissing('GET', '/v1/sprites/{name}/exec?cmd=id', {
    token: TOKEN_RESTRICTED,
    victims: ['other'],
    upgrade: true,
  });
  await failsLikeMissing((n) => r.sprite(n).filesystem('/').readdir('.'), { victims: ['other'] });
  await assert.rejects(r.createSprite('newone'), (e) => statusOf(e) === 403);
});

test('a viewer lists and reads but cannot exec', async () => {
  const v = new SpritesClient(TOKEN_VIEWER, { baseURL: URL_ });
  assert.deepEqual((await v.listAllSprites()).map((s) => s.name).sort(), ['other', 'secret']);
  assert.equal((await v.getSprite('secret')).name, 'secret');
  await assert.rejects(
    v.sprite('secret').execFileHTTP('cat', ['/home/sprite/note.txt']),
    (e) => e instanceof APIError && e.statusCode === 403,
  );
  await assert.rejects(v.sprite('secret').execFile('id'));
  const ws = await request('GET', '/v1/sprites/secret/exec?cmd=id', { token: TOKEN_VIEWER, upgrade: true });
  assert.equal(ws.status, 403, ws.body);
  assert.equal(JSON.parse(ws.body).error, 'forbidden');
  await assert.rejects(v.sprite('secret').filesystem('/home/sprite').writeFile('note.txt', 'pwned'));
  assert.equal(await throughProxy(v, 'secret'), '');
});
