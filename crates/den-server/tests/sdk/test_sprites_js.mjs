// The official JavaScript SDK (@fly/sprites) against a real den server.
//
// Run by the Rust test `sdk_js` (tests/api/sdk.rs) with Node.js 24 (the
// SDK's minimum) and `node --test`. The Rust side starts the server and sets
// DEN_TEST_URL, DEN_TEST_TOKEN and DEN_SPRITES_JS (the SDK's entry point, as
// installed by scripts/install-deps.sh). Only the base URL differs from using
// the hosted service.

import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { after, before, test } from 'node:test';

const { SpritesClient, ExecError, APIError, FilesystemError } = await import(process.env.DEN_SPRITES_JS);

const URL_ = process.env.DEN_TEST_URL;
const TOKEN = process.env.DEN_TEST_TOKEN;
const client = new SpritesClient(TOKEN, { baseURL: URL_ });
let sprite;

before(async () => {
  sprite = await client.createSprite('js-main');
});

after(async () => {
  await client.deleteSprite('js-main');
});

// spawn() starts the command itself and says so with 'spawn'.
function started(cmd) {
  return new Promise((resolve, reject) => {
    cmd.once('spawn', resolve);
    cmd.once('error', reject);
  });
}

// GET a sprite URL (http://NAME.localhost:PORT/) through the server's
// address: *.localhost names do not resolve everywhere.
function getSpriteURL(url, headers = {}) {
  const u = new URL(url);
  const api = new URL(URL_);
  return new Promise((resolve, reject) => {
    const req = http.get(
      { host: api.hostname, port: api.port, path: u.pathname, headers: { ...headers, host: u.host } },
      (res) => {
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode, body }));
      },
    );
    req.on('error', reject);
  });
}

async function waitFor(what, cond, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('create, get, list, update, delete', async () => {
  const s = await client.createSprite('js-crud', { labels: ['sdk'] });
  assert.equal(s.name, 'js-crud');
  const got = await client.getSprite('js-crud');
  assert.equal(got.name, 'js-crud');
  assert.deepEqual(got.labels, ['sdk']);
  assert.equal(got.urlSettings?.auth, 'sprite');
  const all = await client.listAllSprites('js-');
  assert.ok(all.some((x) => x.name === 'js-crud'), JSON.stringify(all.map((x) => x.name)));
  const page = await client.listSprites({ prefix: 'js-', maxResults: 1 });
  assert.equal(page.sprites.length, 1);
  assert.equal(page.hasMore, true);
  const upd = await client.updateSprite('js-crud', { urlSettings: { auth: 'public' }, labels: ['a'] });
  assert.equal(upd.urlSettings?.auth, 'public');
  await client.deleteSprite('js-crud');
  await assert.rejects(client.getSprite('js-crud'));
});

test('exec: output, arguments, env, cwd and exit codes', async () => {
  const r = await sprite.execFile('sh', ['-c', 'echo "$A" in $(pwd); echo oops >&2'], {
    env: { A: 'hello' },
    cwd: '/tmp',
  });
  assert.equal(r.stdout, 'hello in /tmp\n');
  assert.equal(r.stderr, 'oops\n');
  assert.equal(r.exitCode, 0);
  await assert.rejects(sprite.execFile('sh', ['-c', 'exit 7']), (e) => e instanceof ExecError && e.exitCode === 7);
});

test('fifty fast commands lose no output', async () => {
  for (let i = 0; i < 50; i++) {
    const r = await sprite.execFile('echo', [`n${i}`]);
    assert.equal(r.stdout, `n${i}\n`);
  }
});

test('spawn: stdin is piped through and EOF ends the command', async () => {
  const cmd = sprite.spawn('sh', ['-c', 'wc -c; echo done']);
  let out = '';
  cmd.stdout.on('data', (c) => (out += c.toString()));
  await started(cmd);
  const payload = Buffer.alloc(3 << 20, 7);
  cmd.stdin.write(payload);
  cmd.stdin.end();
  const code = await cmd.wait();
  assert.equal(code, 0);
  assert.equal(out.trim().split(/\s+/).join(' '), `${payload.length} done`);
});

test('tty: size and resize', async () => {
  const cmd = sprite.spawn('sh', ['-c', 'stty size; read x; stty size'], { tty: true, rows: 30, cols: 100 });
  let out = '';
  cmd.stdout.on('data', (c) => (out += c.toString()));
  await started(cmd);
  await waitFor('the first stty size', () => out.includes('30 100'));
  cmd.resize(120, 40);
  cmd.stdin.write('\n');
  assert.equal(await cmd.wait(), 0);
  assert.match(out, /40 120/);
});

test('HTTP exec', async () => {
  const r = await sprite.execFileHTTP('sh', ['-c', 'echo via-http; exit 0']);
  assert.equal(r.stdout, 'via-http\n');
  assert.equal(r.exitCode, 0);
});

// The SDK takes each read of the body as one frame. The exit frame used to
// reach it in the same read as the output (Nagle's algorithm held the output
// until the client's delayed ACK, and the exit frame joined it): "HTTP exec
// response did not include an exit frame" in 2 of 5 tries. The SDK's fetch
// pools its connection, which is where that happened.
test('HTTP exec with input, 50 times in a row', async () => {
  for (let i = 0; i < 50; i++) {
    const r = await sprite.execFileHTTP('cat', [], { input: `line ${i}\n` });
    assert.equal(r.stdout, `line ${i}\n`, `run ${i}`);
    assert.equal(r.exitCode, 0, `run ${i}`);
  }
});

test('filesystem round trip', async () => {
  const fs = sprite.filesystem('/home/sprite');
  await fs.mkdir('jsdir/sub', { recursive: true });
  await fs.writeFile('jsdir/sub/a.txt', 'alpha');
  await fs.writeFile('jsdir/bin.dat', Buffer.from([0, 1, 2, 255]));
  assert.equal(await fs.readFile('jsdir/sub/a.txt', 'utf8'), 'alpha');
  assert.deepEqual([...(await fs.readFile('jsdir/bin.dat'))], [0, 1, 2, 255]);
  const names = (await fs.readdir('jsdir')).sort();
  assert.deepEqual(names, ['bin.dat', 'sub']);
  const st = await fs.stat('jsdir/sub/a.txt');
  assert.equal(st.size, 5);
  await fs.rename('jsdir/sub/a.txt', 'jsdir/b.txt');
  await fs.copyFile('jsdir/b.txt', 'jsdir/c.txt');
  assert.equal(await fs.readFile('jsdir/c.txt', 'utf8'), 'alpha');
  assert.equal(await fs.exists('jsdir/sub/a.txt'), false);
  await fs.chmod('jsdir/c.txt', 0o600);
  const mode = await sprite.execFile('stat', ['-c', '%a', '/home/sprite/jsdir/c.txt']);
  assert.equal(mode.stdout.trim(), '600');
  await assert.rejects(fs.readFile('nope.txt', 'utf8'), (e) => e instanceof FilesystemError && e.code === 'ENOENT');
  await fs.rm('jsdir', { recursive: true });
  assert.equal(await fs.exists('jsdir'), false);
});

test('checkpoint and restore rewind the disk', async () => {
  await sprite.execFile('sh', ['-c', 'echo before > /home/sprite/state']);
  const stream = await sprite.createCheckpoint('js');
  await stream.processAll(() => {});
  const cps = await sprite.listCheckpoints();
  const cp = cps.find((c) => c.comment === 'js');
  assert.ok(cp, JSON.stringify(cps));
  assert.equal((await sprite.getCheckpoint(cp.id)).id, cp.id);
  await sprite.execFile('sh', ['-c', 'echo after > /home/sprite/state']);
  const restore = await sprite.restoreCheckpoint(cp.id);
  await restore.processAll(() => {});
  const r = await waitFor('the restored sprite to answer', async () => {
    try {
      return await sprite.execFile('cat', ['/home/sprite/state']);
    } catch {
      return null;
    }
  });
  assert.equal(r.stdout, 'before\n');
});

test('a service serves the sprite URL; auth modes', async () => {
  const s = await client.createSprite('js-web');
  try {
    const logs = await s.createService('web', {
      cmd: 'sh',
      args: ['-c', 'mkdir -p /tmp/www && echo served > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www'],
      httpPort: 8080,
    });
    logs.close();
    const svc = await waitFor('the service to run', async () => {
      const all = await s.listServices();
      const w = all.find((x) => x.name === 'web');
      return w && w.state?.status === 'running' ? w : null;
    });
    assert.equal(svc.httpPort ?? svc.http_port, 8080);
    const info = await client.getSprite('js-web');
    const body = await waitFor('the URL to serve', async () => {
      const r = await getSpriteURL(info.url, { authorization: `Bearer ${TOKEN}` });
      return r.status === 200 ? r.body : null;
    });
    assert.equal(body.trim(), 'served');
    assert.equal((await getSpriteURL(info.url)).status, 401);
    await s.updateURLSettings({ auth: 'public' });
    assert.equal((await getSpriteURL(info.url)).status, 200);
    await s.deleteService('web');
  } finally {
    await client.deleteSprite('js-web');
  }
});

test('TCP proxy to a port inside the sprite', async () => {
  // TTY: this SDK drops text messages of non-TTY commands.
  const srv = sprite.spawn('sh', ['-c', 'echo proxied | nc -l -p 7000'], { tty: true });
  // den announces ports a command opens; proxy only once nc listens (this
  // SDK waits 10 s on a tunnel whose target refused).
  const listening = new Promise((resolve) =>
    srv.on('message', (m) => m?.type === 'port_opened' && m.port === 7000 && resolve(m)),
  );
  await started(srv);
  await listening;
  const port = await new Promise((resolve) => {
    const l = net.createServer();
    l.listen(0, '127.0.0.1', () => {
      const p = l.address().port;
      l.close(() => resolve(p));
    });
  });
  const session = await sprite.proxyPort(port, 7000);
  try {
    const got = await waitFor('the proxied banner', () =>
      new Promise((resolve) => {
        const c = net.connect(port, '127.0.0.1');
        let data = '';
        c.on('data', (d) => (data += d));
        c.on('close', () => resolve(data.includes('proxied') ? data : null));
        c.on('error', () => resolve(null));
      }),
    );
    assert.equal(got.trim(), 'proxied');
  } finally {
    session.close();
    srv.kill();
  }
});

test('network policy', async () => {
  const policy = { rules: [{ domain: 'example.com', action: 'allow' }, { domain: '*', action: 'deny' }] };
  await sprite.updateNetworkPolicy(policy);
  const got = await sprite.getNetworkPolicy();
  assert.deepEqual(
    got.rules.map((r) => [r.domain, r.action]),
    [
      ['example.com', 'allow'],
      ['*', 'deny'],
    ],
  );
  await assert.rejects(sprite.updateNetworkPolicy({ rules: [{ domain: 'x.com', action: 'maybe' }] }));
  await sprite.updateNetworkPolicy({ rules: [] });
});

test('sessions: list, attach with replay, kill', async () => {
  const cmd = sprite.createSession('sh', ['-c', 'echo first; sleep 600'], { tty: true });
  const cmdMessages = [];
  cmd.on('message', (m) => cmdMessages.push(m));
  let out = '';
  cmd.stdout.on('data', (c) => (out += c.toString()));
  await started(cmd);
  await waitFor('the session output', () => out.includes('first'));
  const sessions = await sprite.listSessions();
  const mine = sessions.find((s) => String(s.command ?? '').includes('sleep 600') || s.tty);
  assert.ok(mine, JSON.stringify(sessions));
  // A second client attaches while the first is still there.
  const att = sprite.attachSession(String(mine.id), { tty: true });
  const attMessages = [];
  att.on('message', (m) => attMessages.push(m));
  let replay = '';
  att.stdout.on('data', (c) => (replay += c.toString()));
  await started(att);
  await waitFor('the replayed scrollback', () => replay.includes('first'));
  const kill = await sprite.killSession(String(mine.id), 'KILL');
  await kill.processAll(() => {});
  // Both clients see the end. This SDK takes a TTY command's exit code from
  // the close code alone, so the status is checked in the `exit` message
  // den sends before closing.
  await Promise.all([cmd.wait(), att.wait()]);
  for (const msgs of [cmdMessages, attMessages]) {
    assert.ok(
      msgs.some((m) => m?.type === 'exit' && m.exit_code === 137),
      JSON.stringify(msgs),
    );
  }
  await waitFor('the session to go', async () => !(await sprite.listSessions()).some((s) => s.id === mine.id));
});

test('a wrong token is refused', async () => {
  const bad = new SpritesClient('den_wrong', { baseURL: URL_ });
  await assert.rejects(bad.listSprites(), (e) => (e instanceof APIError ? e.statusCode === 401 : /401/.test(String(e))));
});

// The next message of an SDK stream (watchers, watchSprites) that
// satisfies `pred`, within a deadline.
async function nextMatching(stream, pred, what, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  const seen = [];
  for (;;) {
    const left = deadline - Date.now();
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}; saw ${JSON.stringify(seen)}`)), Math.max(left, 0));
    });
    const ev = await Promise.race([stream.next(), timeout]).finally(() => clearTimeout(timer));
    if (ev === null) throw new Error(`the stream ended before ${what}; saw ${JSON.stringify(seen)}`);
    if (pred(ev)) return ev;
    seen.push(ev);
  }
}

test('restartSprite and checkSprite; last_started_at and last_active_at', async () => {
  const s = await client.createSprite('js-life');
  try {
    const cold = await client.checkSprite('js-life');
    assert.equal(cold.spriteName, 'js-life');
    assert.equal(cold.status, 'cold');
    assert.ok(cold.reason);
    assert.ok(cold.checkedAt instanceof Date && !Number.isNaN(cold.checkedAt.getTime()));
    await s.execFile('sh', ['-c', 'sleep 1000 </dev/null >/dev/null 2>&1 &']);
    const ok = await s.check();
    assert.equal(ok.status, 'healthy');
    assert.equal(typeof ok.elapsed, 'number');
    assert.ok(ok.spriteId);
    const r = await s.restart();
    assert.equal(r.spriteName, 'js-life');
    assert.ok(r.machineId && r.message, JSON.stringify(r));
    const ps = await s.execFile('sh', ['-c', "ps | grep -c '[s]leep 1000' || true"]);
    assert.equal(ps.stdout.trim(), '0');
    const raw = await (await fetch(`${URL_}/v1/sprites/js-life`, { headers: { authorization: `Bearer ${TOKEN}` } })).json();
    assert.ok(!Number.isNaN(Date.parse(raw.last_started_at)), JSON.stringify(raw));
    assert.ok(!Number.isNaN(Date.parse(raw.last_active_at)), JSON.stringify(raw));
  } finally {
    await client.deleteSprite('js-life');
  }
});

test('watchSprites: a new sprite and its state changes', async () => {
  const stream = await client.watchSprites({ prefix: 'js-watched' });
  try {
    await client.createSprite('js-watched');
    const made = await nextMatching(stream, (e) => e.name === 'js-watched', 'the new sprite');
    assert.equal(made.status, 'cold');
    assert.ok(made.timestamp instanceof Date);
    assert.equal(typeof made.organization.name, 'string');
    await client.sprite('js-watched').execFile('true');
    const running = await nextMatching(stream, (e) => e.name === 'js-watched' && e.status === 'running', 'running');
    assert.ok(running.lastRunningAt instanceof Date);
    assert.ok(running.organization.running >= 1);
  } finally {
    stream.close();
    await client.deleteSprite('js-watched');
  }
});

test('watchPorts: port_list, then a listener opening and closing', async () => {
  const watcher = await sprite.watchPorts();
  try {
    const first = await nextMatching(watcher, () => true, 'port_list');
    assert.equal(first.type, 'port_list');
    assert.ok(Array.isArray(first.ports));
    // busybox's httpd: the test image has no python3.
    await sprite.execFile('sh', ['-c', 'httpd -p 8123 -h /tmp']);
    const opened = await nextMatching(watcher, (e) => e.type === 'port_opened' && e.port === 8123, 'port_opened 8123');
    assert.ok(opened.pid > 0);
    // The IP address it is bound to (the SDK's type; the docs show a URL).
    assert.ok(['0.0.0.0', '::'].includes(opened.address), JSON.stringify(opened));
    await sprite.execFile('kill', [String(opened.pid)]);
    const closed = await nextMatching(watcher, (e) => e.type === 'port_closed' && e.port === 8123, 'port_closed 8123');
    assert.equal(closed.pid, opened.pid);
  } finally {
    watcher.close();
  }
});

test('filesystem().watch: create, write, chmod, remove', async () => {
  const fs = sprite.filesystem('/home/sprite');
  await fs.mkdir('watched', { recursive: true });
  const watcher = await fs.watch('watched', { recursive: true });
  try {
    const sub = await nextMatching(watcher, (e) => e.type === 'subscribed', 'subscribed');
    assert.deepEqual(sub.paths, ['/home/sprite/watched']);
    const p = '/home/sprite/watched/a.txt';
    await fs.writeFile('watched/a.txt', 'hello');
    const made = await nextMatching(watcher, (e) => e.type === 'event' && e.event === 'create' && e.path === p, 'create');
    assert.equal(made.isDir, false);
    assert.ok(!Number.isNaN(Date.parse(made.timestamp)));
    await sprite.execFile('sh', ['-c', `echo more >> ${p}`]);
    await nextMatching(watcher, (e) => e.event === 'write' && e.path === p, 'write');
    await fs.chmod('watched/a.txt', 0o600);
    await nextMatching(watcher, (e) => e.event === 'chmod' && e.path === p, 'chmod');
    await fs.rm('watched/a.txt');
    await nextMatching(watcher, (e) => e.event === 'remove' && e.path === p, 'remove');
  } finally {
    watcher.close();
    await fs.rm('watched', { recursive: true });
  }
});

test('filesystem chown by number and by name', async () => {
  const fs = sprite.filesystem('/home/sprite');
  await fs.writeFile('owned.txt', 'x');
  await fs.chown('owned.txt', { uid: 0, gid: 'root' });
  let r = await sprite.execFile('stat', ['-c', '%u:%g', '/home/sprite/owned.txt']);
  assert.equal(r.stdout.trim(), '0:0');
  await fs.chown('owned.txt', { uid: 'sprite' });
  r = await sprite.execFile('stat', ['-c', '%U', '/home/sprite/owned.txt']);
  assert.equal(r.stdout.trim(), 'sprite');
  await assert.rejects(fs.chown('nope.txt', { uid: 0 }), (e) => e instanceof FilesystemError && e.code === 'ENOENT');
  await assert.rejects(fs.chown('owned.txt', {}), TypeError);
  await fs.rm('owned.txt');
});
