#!/usr/bin/env node
// An idempotent consumer of the events kallina-relay publishes to RabbitMQ.
//
// The relay delivers at least once, and every copy of an event carries the same message_id.
// Processed ids are kept in an append-only file (one `<message_id>\t<event>` line each), read
// into memory at start and fsync'd before each ack: no database, nothing native to build.
// A delivery whose id is already known is acknowledged without being processed again.
//
//   node consumer.js --exchange kallina.events --queue crm.events --binding 'call.*' \
//       --db processed-ids.log
//
// One line per delivery on standard output: `processed <message_id> <event>`,
// `skipped duplicate <message_id>`, or `rejected <message_id> <reason>`. Exit status: 0 after
// --max-messages or on SIGINT/SIGTERM, 1 when the broker or the file fails, 2 on bad usage or
// when the exchange does not exist.

'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

const USAGE = `usage: consumer.js --queue NAME --db FILE [--exchange NAME] [--binding PATTERN]...
  [--amqp-url URL] [--queue-type classic|quorum] [--prefetch N] [--max-messages N]
  [--secret SECRET]...   (default: KALLINA_WEBHOOK_SECRET, comma-separated)`;

class Rejected extends Error {}

function options() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        'amqp-url': { type: 'string', default: 'amqp://guest:guest@127.0.0.1:5672/%2f' },
        exchange: { type: 'string', default: 'kallina.events' },
        queue: { type: 'string' },
        binding: { type: 'string', multiple: true },
        'queue-type': { type: 'string' },
        db: { type: 'string' },
        prefetch: { type: 'string', default: '16' },
        'max-messages': { type: 'string', default: '0' },
        secret: { type: 'string', multiple: true },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (e) {
    console.error(`${e.message}\n${USAGE}`);
    process.exit(2);
  }
  const prefetch = Number(values.prefetch);
  const maxMessages = Number(values['max-messages']);
  const queueType = values['queue-type'];
  if (
    values.help ||
    !values.queue ||
    !values.db ||
    !Number.isInteger(prefetch) ||
    prefetch < 1 ||
    !Number.isInteger(maxMessages) ||
    maxMessages < 0 ||
    (queueType && !['classic', 'quorum'].includes(queueType))
  ) {
    console.error(USAGE);
    process.exit(values.help ? 0 : 2);
  }
  const fromEnv = (process.env.KALLINA_WEBHOOK_SECRET || '').split(',').filter(Boolean);
  return {
    url: values['amqp-url'],
    exchange: values.exchange,
    queue: values.queue,
    bindings: values.binding || ['#'],
    queueType,
    db: values.db,
    prefetch,
    maxMessages,
    secrets: values.secret || fromEnv,
  };
}

// The ids already processed. A crash can leave a last line half written; it was never
// fsync'd, so its message was never acked and will come again: it is cut off here, or the next
// append would be glued to it.
function openLog(path) {
  const fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_APPEND, 0o644);
  let text = fs.readFileSync(fd, 'utf8');
  const complete = text.lastIndexOf('\n') + 1;
  if (complete < text.length) {
    fs.ftruncateSync(fd, Buffer.byteLength(text.slice(0, complete)));
    fs.fsyncSync(fd);
    text = text.slice(0, complete);
  }
  const seen = new Set();
  for (const line of text.split('\n')) {
    if (line) seen.add(line.split('\t')[0]);
  }
  return {
    seen,
    record(id, event) {
      fs.writeSync(fd, `${id}\t${event}\n`);
      // The ack follows; without this a power cut could lose the record of a message the
      // broker has already forgotten, and its next copy would be processed again.
      fs.fsyncSync(fd);
      seen.add(id);
    },
    close() {
      fs.closeSync(fd);
    },
  };
}

function verifySignature(secrets, body, header) {
  if (header === undefined || header === null) throw new Rejected('missing x-kallina-signature');
  const [scheme, digest] = String(header).split('=', 2);
  if (scheme !== 'sha256' || !/^[0-9a-fA-F]{64}$/.test(digest || '')) {
    throw new Rejected('malformed x-kallina-signature');
  }
  const given = Buffer.from(digest, 'hex');
  for (const secret of secrets) {
    const expected = crypto.createHmac('sha256', secret).update(body).digest();
    if (crypto.timingSafeEqual(expected, given)) return;
  }
  throw new Rejected('signature mismatch');
}

function parse(body) {
  let envelope;
  try {
    envelope = JSON.parse(body.toString('utf8'));
  } catch (e) {
    throw new Rejected(`body is not JSON: ${e.message}`);
  }
  if (envelope === null || typeof envelope !== 'object' || Array.isArray(envelope) || typeof envelope.event !== 'string') {
    throw new Rejected('body has no string `event`');
  }
  return envelope;
}

// Stands for the real work. It runs before the id is recorded, so a crash between the two
// repeats it: give an outside effect (an HTTP call, an email) the message_id as its own
// idempotency key, or keep its result in the same store as the id (see the Python example).
async function handle(envelope) {
  return envelope.data && typeof envelope.data === 'object' ? envelope.data.call_id : undefined;
}

async function main() {
  const opts = options();
  const log = openLog(opts.db);
  const connection = await amqp.connect(opts.url);
  connection.on('error', (e) => console.error(`broker: ${e.message}`));
  let stopping = false;
  connection.on('close', () => {
    if (!stopping) {
      // Unacked messages go back to the queue; a supervisor restarts this process, and what
      // it had already recorded is skipped when it comes again.
      console.error('broker: connection lost');
      process.exit(1);
    }
  });
  let channel = await connection.createChannel();
  channel.on('error', () => {}); // reported through the rejected promise below
  try {
    await channel.checkExchange(opts.exchange);
  } catch (e) {
    // Declaring it here with other arguments than the relay's would make the relay's own
    // declaration fail; the relay creates it when it first connects.
    console.error(`the exchange \`${opts.exchange}\` does not exist (${e.message}): start the relay first, with this exchange`);
    stopping = true;
    await connection.close().catch(() => {});
    process.exit(2);
  }
  channel = await connection.createChannel();
  channel.on('error', (e) => console.error(`broker: ${e.message}`));
  channel.on('close', () => {
    if (!stopping) process.exit(1);
  });
  const args = opts.queueType ? { 'x-queue-type': opts.queueType } : undefined;
  await channel.assertQueue(opts.queue, { durable: true, arguments: args });
  for (const pattern of opts.bindings) {
    await channel.bindQueue(opts.queue, opts.exchange, pattern);
  }
  // Bounds what is unacknowledged at once: with manual acks the broker would otherwise push the
  // whole queue into this process's memory.
  await channel.prefetch(opts.prefetch);

  let handled = 0;
  const stop = async (code) => {
    if (stopping) return;
    stopping = true;
    await connection.close().catch(() => {});
    log.close();
    process.exit(code);
  };
  process.on('SIGTERM', () => stop(0));
  process.on('SIGINT', () => stop(0));

  // One message at a time, in delivery order: a second copy of an id must not be checked while
  // the first is still being processed.
  let queue = Promise.resolve();
  const onMessage = async (msg) => {
    if (msg === null) {
      console.error('broker: the subscription was cancelled');
      return stop(1);
    }
    if (stopping) return;
    const props = msg.properties;
    // The relay always sets message_id; for a message from elsewhere the SHA-256 of the body is
    // the key the relay would have used.
    const id = props.messageId || crypto.createHash('sha256').update(msg.content).digest('hex');
    let line;
    try {
      if (opts.secrets.length) {
        verifySignature(opts.secrets, msg.content, (props.headers || {})['x-kallina-signature']);
      }
      const envelope = parse(msg.content);
      if (log.seen.has(id)) {
        line = `skipped duplicate ${id}`;
      } else {
        await handle(envelope);
        log.record(id, envelope.event);
        line = `processed ${id} ${envelope.event}`;
      }
    } catch (e) {
      if (e instanceof Rejected) {
        // Not requeued: the same bytes would fail the same way forever, in a hot loop. Give
        // the queue a dead-letter policy to keep such messages for inspection.
        channel.nack(msg, false, false);
        console.log(`rejected ${id} ${e.message}`);
        return;
      }
      // The file or the handler failed, not the message: exit without acking, and the broker
      // hands it to the next consumer.
      console.error(`failed on ${id}: ${e.stack || e}`);
      return stop(1);
    }
    channel.ack(msg);
    console.log(line);
    handled += 1;
    if (opts.maxMessages && handled >= opts.maxMessages) await stop(0);
  };
  await channel.consume(opts.queue, (msg) => {
    queue = queue
      .then(() => onMessage(msg))
      .catch((e) => {
        console.error(`broker: ${e.message}`);
        return stop(1);
      });
  }, { noAck: false });
  console.log(`ready queue=${opts.queue} exchange=${opts.exchange} bindings=${opts.bindings.join(',')}`);
}

main().catch((e) => {
  console.error(`broker: ${e.message}`);
  process.exit(1);
});
