// The official JavaScript SDK (@fly/sprites) in control mode against a real
// den server: exec, the proxy and filesystem operations over the
// multiplexed control channel (WSS /v1/sprites/{name}/control).
//
// Run by the Rust test `control_js_sdk` (tests/api/control.rs), which sets
// DEN_TEST_URL, DEN_TEST_TOKEN and DEN_SPRITES_JS, and afterwards checks in
// the audit log that every command went over the channel: `execFile` falls
// back to the direct exec WebSocket whenever its control attempt fails, so
// the output alone would not tell.
//
// The SDK's `execFile` uses the channel itself in control mode. For the rest
// the tests drive the SDK's own `ControlConnection` (`startOp`, `OpConn`,
// `sendControl`, `sendData`): SDK 0.1.0 has no proxy or fs helpers over
// control, so those operations are framed as the Go SDK frames them.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

const { SpritesClient } = await import(process.env.DEN_SPRITES_JS);

const URL_ = process.env.DEN_TEST_URL;
const TOKEN = process.env.DEN_TEST_TOKEN;
const NAME = 'js-ctl';
const client = new SpritesClient(TOKEN, { baseURL: URL_, controlMode: true });
let sprite;

before(async () => {
  sprite = await client.createSprite(NAME);
});

after(async () => {
  sprite.closeControlConnection();
  await client.deleteSprite(NAME);
});

async function waitFor(what, cond, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// Runs one operation on `cc` and collects what it sends: ops.start with
// `args` (an object, or a URL-encoded string as the Go SDK sends), then the
// `data` frames; resolves at op.complete with its args and the frames.
function rawOp(cc, op, args, data = []) {
  return new Promise((resolve, reject) => {
    const frames = [];
    const onMessage = (ev) => {
      if (typeof ev.data === 'string' && ev.data.startsWith('control:')) {
        const m = JSON.parse(ev.data.slice('control:'.length));
        if (m.type === 'op.ack') return;
        cc.ws.removeEventListener('message', onMessage);
        if (m.type === 'op.complete') resolve({ args: m.args, frames });
        else reject(Object.assign(new Error(m.args?.error), { args: m.args }));
        return;
      }
      frames.push(typeof ev.data === 'string' ? JSON.parse(ev.data) : Buffer.from(ev.data));
    };
    cc.ws.addEventListener('message', onMessage);
    cc.sendControl({ type: 'op.start', op, args });
    for (const d of data) cc.sendData(d);
  });
}

function collect(op) {
  const out = { stdout: '', stderr: '', messages: [] };
  op.on('stdout', (d) => (out.stdout += d.toString()));
  op.on('stderr', (d) => (out.stderr += d.toString()));
  op.on('message', (m) => out.messages.push(m));
  return out;
}

test('execFile runs over the control channel: stdout, stderr, env, dir', async () => {
  const r = await sprite.execFile('/bin/sh', ['-c', 'echo out; echo err >&2; echo "$FOO"; pwd'], {
    env: { FOO: 'bar' },
    cwd: '/tmp',
  });
  assert.equal(r.stdout, 'out\nbar\n/tmp\n');
  assert.equal(r.stderr, 'err\n');
  assert.equal(r.exitCode, 0);
  assert.ok(sprite.hasControlConnection(), 'the pool holds a control connection');
});

test('exit codes and stdin through ControlConnection.startOp', async () => {
  const cc = await sprite.getControlConnection();
  const failing = await cc.startOp('exec', { cmd: ['/bin/sh', '-c', 'echo bye; exit 3'] });
  const out = collect(failing);
  failing.sendEOF();
  assert.equal(await failing.wait(), 3);
  assert.equal(out.stdout, 'bye\n');
  assert.ok(out.messages.some((m) => m.type === 'session_info' && m.tty === false), JSON.stringify(out.messages));

  // The same channel carries the next operation.
  const cat = await cc.startOp('exec', { cmd: ['cat'], stdin: true });
  const got = collect(cat);
  cat.write(Buffer.from('hello over control\n'));
  cat.sendEOF();
  assert.equal(await cat.wait(), 0);
  assert.equal(got.stdout, 'hello over control\n');
});

test('a TTY command gets its size, a resize and a signal', async () => {
  const cc = await sprite.getControlConnection();
  const op = await cc.startOp('exec', {
    cmd: ['/bin/sh', '-c', 'stty size; read x; stty size; sleep 600'],
    tty: true,
    rows: 30,
    cols: 100,
  });
  const out = collect(op);
  await waitFor('the first size', () => out.stdout.includes('30 100'));
  op.resize(120, 40);
  op.write(Buffer.from('\n'));
  await waitFor('the new size', () => out.stdout.includes('40 120'));
  op.signal('KILL');
  const code = await op.wait();
  assert.equal(code, 137, out.stdout);
});

test('several commands at once through the pool, and in turn on reused channels', async () => {
  const rs = await Promise.all(
    [0, 1, 2, 3, 4, 5].map((i) => sprite.execFile('/bin/sh', ['-c', `echo n${i}`])),
  );
  assert.deepEqual(
    rs.map((r) => r.stdout),
    ['n0\n', 'n1\n', 'n2\n', 'n3\n', 'n4\n', 'n5\n'],
  );
  for (let i = 0; i < 5; i++) {
    const r = await sprite.execFile('echo', [`again${i}`]);
    assert.equal(r.stdout, `again${i}\n`);
  }
  // Not here: a failing command through execFile. SDK 0.1.0 catches every
  // error of its control attempt, ExecError included, and runs the command
  // again on the direct exec WebSocket; exit codes are checked through
  // startOp above.
});

test('proxy: a TCP tunnel to a port inside the sprite, then the channel is reused', async () => {
  const srvConn = await sprite.getControlConnection();
  const server = await srvConn.startOp('exec', { cmd: ['busybox', 'nc', '-ll', '-p', '7100', '-e', 'cat'] });
  server.sendEOF();
  const cc = await sprite.getControlConnection();
  // Raw tunnel frames are delivered unparsed in the SDK's TTY mode.
  const tunnel = await waitFor('the echo server', async () => {
    const op = await cc.startOp('proxy', { tty: true });
    const out = collect(op);
    // Until nc listens the dial fails: op.error, and the next try.
    const hello = new Promise((resolve) => {
      op.once('error', () => resolve(null));
      op.on('message', (m) => m.status === 'connected' && resolve(m));
    });
    cc.sendData(JSON.stringify({ host: 'localhost', port: 7100 }));
    const ok = await hello;
    return ok ? { op, out, hello: ok } : null;
  });
  assert.equal(tunnel.hello.target, '127.0.0.1:7100');
  tunnel.op.write(Buffer.from('ping over the tunnel\n'));
  await waitFor('the echo', () => tunnel.out.stdout === 'ping over the tunnel\n');
  // op.cancel ends the tunnel, not the channel.
  cc.sendControl({ type: 'op.cancel' });
  await tunnel.op.wait();
  const again = await cc.startOp('exec', { cmd: ['echo', 'same channel'] });
  const out = collect(again);
  again.sendEOF();
  assert.equal(await again.wait(), 0);
  assert.equal(out.stdout, 'same channel\n');

  server.signal('KILL');
  assert.equal(await server.wait(), 137);
});

test('filesystem operations over the channel, beside a running command', async () => {
  const busy = await sprite.getControlConnection();
  const sleeper = await busy.startOp('exec', { cmd: ['/bin/sh', '-c', 'sleep 2; echo slept'] });
  const slept = collect(sleeper);
  sleeper.sendEOF();

  const cc = await sprite.getControlConnection();
  const content = Buffer.from('line one\nline two\n');
  // Relative to the default working directory, /home/sprite; parents are made.
  let r = await rawOp(cc, 'fs.write', { path: 'ctl/a.txt', mode: '0640' }, [content]);
  assert.equal(r.args.ok, true);
  assert.equal(r.frames[0].path, '/home/sprite/ctl/a.txt');
  assert.equal(r.frames[0].size, content.length);

  r = await rawOp(cc, 'fs.read', { path: '/home/sprite/ctl/a.txt' });
  assert.equal(r.frames[0].size, content.length);
  assert.deepEqual(Buffer.concat(r.frames.slice(1)), content);

  // A byte range, with args URL-encoded as the Go SDK sends them.
  r = await rawOp(cc, 'fs.read', 'path=ctl%2Fa.txt&start=5&end=8');
  assert.equal(Buffer.concat(r.frames.slice(1)).toString(), 'one');

  // Several frames make one file when the size is announced.
  r = await rawOp(cc, 'fs.write', { path: '/tmp/parts', size: '6' }, [Buffer.from('abc'), Buffer.from('def')]);
  assert.equal(r.args.ok, true);
  r = await rawOp(cc, 'fs.read', { path: '/tmp/parts' });
  assert.equal(Buffer.concat(r.frames.slice(1)).toString(), 'abcdef');

  r = await rawOp(cc, 'fs.list', { path: 'ctl' });
  const entry = r.frames[0].entries.find((e) => e.name === 'a.txt');
  assert.equal(entry.mode, '0640', JSON.stringify(r.frames[0]));

  r = await rawOp(cc, 'fs.chmod', { path: 'ctl/a.txt', mode: '0600' });
  assert.equal(r.frames[0].affected[0].mode, '0600');
  r = await rawOp(cc, 'fs.copy', { source: 'ctl/a.txt', dest: 'ctl/b.txt' });
  assert.equal(r.args.ok, true);
  r = await rawOp(cc, 'fs.rename', { source: 'ctl/b.txt', dest: 'ctl/c.txt' });
  assert.equal(r.frames[0].dest, '/home/sprite/ctl/c.txt');
  r = await rawOp(cc, 'fs.list', { path: '/home/sprite/ctl' });
  assert.deepEqual(r.frames[0].entries.map((e) => e.name).sort(), ['a.txt', 'c.txt']);
  r = await rawOp(cc, 'fs.delete', { path: 'ctl', recursive: 'true' });
  assert.equal(r.args.ok, true);

  // A missing file: the Sprites fs error shape, and the operation fails.
  r = await rawOp(cc, 'fs.read', { path: 'ctl/a.txt' });
  assert.equal(r.args.ok, false);
  assert.equal(r.frames[0].code, 'ENOENT');
  assert.equal(r.frames[0].path, '/home/sprite/ctl/a.txt');

  // An unknown operation is refused, and the channel goes on.
  await assert.rejects(rawOp(cc, 'fs.nope', {}), (e) => e.args.code === 'op.not_found');
  r = await rawOp(cc, 'fs.list', { path: '/' });
  assert.ok(r.frames[0].count > 0);

  assert.equal(await sleeper.wait(), 0);
  assert.equal(slept.stdout, 'slept\n');
});
