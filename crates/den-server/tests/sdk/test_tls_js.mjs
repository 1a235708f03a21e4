// The official JavaScript SDK (@fly/sprites) against den over HTTPS.
//
// Run by the Rust test `tls_sdks_over_https` (tests/api/tls.rs), which starts
// den with a certificate from a test CA and sets DEN_TEST_URL (https://…),
// DEN_TEST_TOKEN, DEN_SPRITES_JS and NODE_EXTRA_CA_CERTS (that CA: Node.js
// trusts it for fetch and WebSocket alike). Nothing else differs from using
// the hosted service.

import assert from 'node:assert/strict';
import { test } from 'node:test';

const { SpritesClient } = await import(process.env.DEN_SPRITES_JS);

const URL_ = process.env.DEN_TEST_URL;
const client = new SpritesClient(process.env.DEN_TEST_TOKEN, { baseURL: URL_ });

test('create, exec, delete over https', async () => {
  assert.ok(URL_.startsWith('https://'), URL_);
  const s = await client.createSprite('js-tls');
  const got = await client.getSprite('js-tls');
  assert.ok(got.url.startsWith('https://js-tls.'), got.url);
  // execFile runs over a wss:// WebSocket, execFileHTTP over fetch.
  const r = await s.execFile('sh', ['-c', 'echo "$A"; echo oops >&2'], { env: { A: 'over tls' } });
  assert.equal(r.stdout, 'over tls\n');
  assert.equal(r.stderr, 'oops\n');
  const cmd = s.spawn('wc', ['-c']);
  let out = '';
  cmd.stdout.on('data', (c) => (out += c.toString()));
  // stdin is writable once the command runs ('spawn').
  await new Promise((resolve, reject) => {
    cmd.once('spawn', resolve);
    cmd.once('error', reject);
  });
  cmd.stdin.end(Buffer.alloc(64 << 10, 7));
  assert.equal(await cmd.wait(), 0);
  assert.equal(out.trim(), String(64 << 10));
  const h = await s.execFileHTTP('sh', ['-c', 'echo via-http']);
  assert.equal(h.stdout, 'via-http\n');
  await client.deleteSprite('js-tls');
  await assert.rejects(client.getSprite('js-tls'));
});
