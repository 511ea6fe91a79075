// The benchmark's baseline: the webhook receiver a customer would write for themselves in
// Node.js instead of running kallina-relay. It does the essential part of the relay's job
// in the plainest idiomatic way:
// verify the signature in constant time, parse the envelope, publish it persistent to a topic
// exchange keyed by the event type, and answer 2xx only after RabbitMQ confirms the publish.
// It has no dedup, no store and no retry: if the broker is away, the event is refused.
//
// Environment: PORT, AMQP_URL, EXCHANGE, SECRET. It prints "listening" once it is ready.
'use strict';

const crypto = require('crypto');
const express = require('express');
const amqp = require('amqplib');

const { PORT, AMQP_URL, EXCHANGE, SECRET } = process.env;

function verify(body, header) {
  if (typeof header !== 'string' || !header.startsWith('sha256=')) return false;
  const expected = crypto.createHmac('sha256', SECRET).update(body).digest();
  const given = Buffer.from(header.slice('sha256='.length), 'hex');
  return given.length === expected.length && crypto.timingSafeEqual(given, expected);
}

async function main() {
  const connection = await amqp.connect(AMQP_URL);
  const channel = await connection.createConfirmChannel();
  await channel.assertExchange(EXCHANGE, 'topic', { durable: true });

  const app = express();
  app.post('/webhooks/kallina', express.raw({ type: '*/*', limit: '1mb' }), (req, res) => {
    if (!verify(req.body, req.get('X-Kallina-Signature'))) {
      return res.status(401).json({ error: { code: 'invalid_signature' } });
    }
    let event;
    try {
      event = JSON.parse(req.body);
    } catch (e) {
      return res.status(400).json({ error: { code: 'invalid_payload' } });
    }
    if (typeof event.event !== 'string') {
      return res.status(400).json({ error: { code: 'invalid_payload' } });
    }
    const id = crypto.createHash('sha256').update(req.body).digest('hex');
    channel.publish(
      EXCHANGE,
      event.event,
      req.body,
      { persistent: true, messageId: id, contentType: 'application/json' },
      (err) => {
        if (err) return res.status(503).json({ error: { code: 'unavailable' } });
        res.status(202).json({ status: 'accepted', id });
      },
    );
  });
  app.listen(Number(PORT), '127.0.0.1', () => console.log('listening'));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
