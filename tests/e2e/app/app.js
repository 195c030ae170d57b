// The motivating case in miniature: a "server" loop on pg-native (libpq) that also
// calls the scenario's own addon, vault.node, which misbehaves in three known ways.
//
//   node app.js CONNINFO [--seconds S] [--wait]
//
// Every tick (~20 ms) it runs a query through pg-native, churns a 256 KiB Buffer
// (V8/Node allocate and free: no leak) and calls vault.stash(1) (4,000 B leaked).
// Every 25th tick vault.keepResults() runs 50 queries through libpq and keeps 10
// PGresults without PQclear, and vault.contend() makes 4 threads fight over a mutex.
//
// --wait: print "ready <pid>", wait for a line on stdin, run, print
// "done <truth as JSON>", then wait for stdin to close (so natrace can attach first
// and snapshot after); a second line ends the run at the next tick, before --seconds
// (so a test can run it until natrace has seen enough, however slow the machine).
// Without --wait: run, print the same line, exit.
'use strict';
const path = require('path');
const readline = require('readline');
const Client = require('pg-native');
const vault = require(process.env.VAULT_ADDON || path.join(__dirname, 'build', 'vault.node'));

const conninfo = process.argv[2];
const argValue = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const seconds = argValue('--seconds', 6);
const wait = process.argv.includes('--wait');
let stopping = false;  // --wait's second line

const STASH_BLOCK = 4000;   // vault.c
const KEEP_EVERY_TICKS = 25;
const QUERIES = 50;
const KEEP_EVERY = 5;       // 50 queries -> 10 PGresults kept

function serve(done) {
  const client = new Client();
  client.connectSync(conninfo);
  const truth = { stash_blocks: 0, stash_bytes: 0, kept_results: 0, ticks: 0, rows: 0 };
  const end = Date.now() + seconds * 1000;
  const tick = () => {
    truth.rows += client.querySync('SELECT g, md5(g::text) FROM generate_series(1, 50) AS g').length;
    Buffer.alloc(256 * 1024).fill(truth.ticks & 0xff);
    // With --expose-gc, a collection every 10th tick frees the churned Buffers within
    // 200 ms; otherwise V8 frees them only once 64 MiB of them (~5 s of ticks, longer on
    // a loaded machine) add up: a sawtooth that a few seconds of top see as growth.
    if (typeof global.gc === 'function' && truth.ticks % 10 === 9) global.gc();
    vault.stash(1);
    truth.stash_blocks += 1;
    truth.stash_bytes += STASH_BLOCK;
    truth.ticks += 1;
    if (truth.ticks % KEEP_EVERY_TICKS === 0) {
      truth.kept_results += vault.keepResults(conninfo, QUERIES, KEEP_EVERY);
      vault.contend(4, 40000);
    }
    if (Date.now() < end && !stopping) {
      setTimeout(tick, 20);
    } else {
      client.end();
      done(truth);
    }
  };
  tick();
}

function finish(truth) {
  const mem = process.memoryUsage();  // V8's own figures, for the RSS split
  truth.heap_total = mem.heapTotal;
  truth.heap_used = mem.heapUsed;
  process.stdout.write(`done ${JSON.stringify(truth)}\n`);
}

if (!wait) {
  serve(finish);
} else {
  process.stdout.write(`ready ${process.pid}\n`);
  const rl = readline.createInterface({ input: process.stdin });
  let started = false;
  rl.on('line', () => {
    if (started) {
      stopping = true;
      return;
    }
    started = true;
    serve(finish);
  });
  rl.on('close', () => process.exit(0));
}
