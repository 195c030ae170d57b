// node workload: allocate Buffers (kept in a 256-entry ring) and call a native
// addon that makes 4 malloc/free pairs, ITERS times (default 200000).
// usage: node node_buffers.js ADDON.node [ITERS]
'use strict';
const addon = require(process.argv[2]);
const iters = Number(process.argv[3] || 200000);
const ADDON_PAIRS = 4;

function onByte(next) {
  process.stdin.once('data', next);
  process.stdin.once('end', next);
  process.stdin.resume();
}

function hot() {
  const ring = new Array(256);
  let sum = 0;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < iters; i++) {
    const b = Buffer.alloc(1024 + (i % 8) * 1024);
    b[0] = i & 0xff;
    ring[i & 255] = b;
    sum += addon.work(ADDON_PAIRS);
  }
  const ns = process.hrtime.bigint() - t0;
  const cpu = process.cpuUsage(cpu0);  // microseconds, user and system, all threads
  // calls: one Buffer allocation and one addon call per iteration
  process.stdout.write(`hot_ns=${ns} calls=${iters * 2} cpu_ns=${(cpu.user + cpu.system) * 1000} ` +
                       `sum=${sum}\n`);
  ring.fill(undefined);
  process.stdout.write('idle\n');
  onByte(() => process.exit(0));
}

process.stdout.write(`ready pid=${process.pid}\n`);
let started = false;
onByte(() => { if (!started) { started = true; process.stdin.pause(); setImmediate(hot); } });
