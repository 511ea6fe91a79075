#!/usr/bin/env python3
"""An idempotent consumer of the events kallina-relay publishes to RabbitMQ.

The relay delivers at least once: the same event can arrive twice (a lost publisher confirm, a
relay killed before it deleted the event from its outbox, an operator's redelivery). Each copy
carries the same `message_id`, so this consumer keeps the ids it has processed in SQLite, in the
same transaction as the processing's own result, and acknowledges only after that commit. A
delivery whose id is already recorded is acknowledged without being processed again, also after
a restart.

    python3 consumer.py --exchange kallina.events --queue crm.events --binding 'call.*' \
        --db processed.sqlite3

One line per delivery on standard output: `processed <message_id> <event>`,
`skipped duplicate <message_id>`, or `rejected <message_id> <reason>`. Exit status: 0 after
--max-messages or on SIGINT/SIGTERM, 1 when the broker or the database fails, 2 on bad usage or
when the exchange does not exist.
"""

import argparse
import hashlib
import hmac
import json
import os
import signal
import sqlite3
import sys
import time

import pika
import pika.exceptions

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


class Rejected(Exception):
    """A delivery that can never be processed, however often it is retried."""


class Stop(Exception):
    """SIGTERM or enough messages: leave the consume loop cleanly."""


def say(line):
    print(line, flush=True)


def open_db(path):
    # isolation_level=None: transactions are begun by hand, so that the duplicate check and the
    # insert happen under one write lock (BEGIN IMMEDIATE) even with several consumers sharing
    # the file.
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    # A commit must be on disk before the ack that follows it, or a crash could lose the record
    # of a message the broker has already forgotten, and the next copy would be processed again.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        """CREATE TABLE IF NOT EXISTS processed (
               message_id   TEXT PRIMARY KEY,
               event        TEXT NOT NULL,
               result       TEXT NOT NULL,
               processed_at TEXT NOT NULL
           )"""
    )
    return db


def verify_signature(secrets, body, header):
    """The relay passes on X-Kallina-Signature as received: sha256=<hex HMAC-SHA256 of body>."""
    if not isinstance(header, (str, bytes)):
        raise Rejected("missing x-kallina-signature")
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    scheme, _, digest = header.partition("=")
    if scheme != "sha256" or len(digest) != 64:
        raise Rejected("malformed x-kallina-signature")
    digest = digest.lower()
    for secret in secrets:
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, digest):
            return
    raise Rejected("signature mismatch")


def parse(body):
    try:
        envelope = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise Rejected(f"body is not JSON: {e}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("event"), str):
        raise Rejected("body has no string `event`")
    return envelope


def handle(envelope):
    """Stands for the real work. It runs inside the transaction that records the message_id,
    so what it returns (and whatever it writes to the same database) happens exactly once. An
    effect outside the database (an HTTP call, an email) is repeated if the process dies before
    the commit: give it the message_id as its own idempotency key."""
    data = envelope.get("data") if isinstance(envelope.get("data"), dict) else {}
    facts = [f"{k}={data[k]}" for k in ("call_id", "agent_id", "outcome", "sentiment") if k in data]
    return " ".join(facts) or "no data"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=DEFAULT_URL)
    parser.add_argument("--exchange", default="kallina.events")
    parser.add_argument("--queue", required=True, help="durable queue, declared if missing")
    parser.add_argument(
        "--binding",
        action="append",
        help="routing pattern (event type, call.*, #); repeatable; default #",
    )
    parser.add_argument(
        "--queue-type",
        choices=["classic", "quorum"],
        help="x-queue-type to declare with; needed to match a quorum queue declared elsewhere",
    )
    parser.add_argument("--db", required=True, help="SQLite file of processed message ids")
    parser.add_argument("--prefetch", type=int, default=16)
    parser.add_argument(
        "--max-messages",
        type=int,
        default=0,
        help="exit after this many processed or skipped deliveries (0: never)",
    )
    parser.add_argument(
        "--secret",
        action="append",
        help="verify x-kallina-signature with this webhook secret; repeatable for a rotation; "
        "default: KALLINA_WEBHOOK_SECRET (comma-separated), else no check",
    )
    args = parser.parse_args()
    secrets = args.secret or [s for s in os.environ.get("KALLINA_WEBHOOK_SECRET", "").split(",") if s]
    bindings = args.binding or ["#"]

    db = open_db(args.db)
    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    try:
        channel.exchange_declare(args.exchange, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        # Declaring it here with other arguments than the relay's would make the relay's own
        # declaration fail; the relay creates it when it first connects.
        print(
            f"the exchange `{args.exchange}` does not exist ({e.reply_text}): "
            "start the relay first, with this exchange",
            file=sys.stderr,
        )
        return 2
    arguments = {"x-queue-type": args.queue_type} if args.queue_type else None
    channel.queue_declare(args.queue, durable=True, arguments=arguments)
    for pattern in bindings:
        channel.queue_bind(args.queue, args.exchange, routing_key=pattern)
    # Bounds what is unacknowledged at once: with manual acks, the broker would otherwise push
    # the whole queue into this process's memory.
    channel.basic_qos(prefetch_count=args.prefetch)

    handled = 0

    def on_message(ch, method, properties, body):
        nonlocal handled
        # The relay always sets message_id; for a message from elsewhere, the SHA-256 of the body
        # is the same key the relay would have used.
        message_id = properties.message_id or hashlib.sha256(body).hexdigest()
        try:
            if secrets:
                verify_signature(secrets, body, (properties.headers or {}).get("x-kallina-signature"))
            envelope = parse(body)
            db.execute("BEGIN IMMEDIATE")
            try:
                seen = db.execute(
                    "SELECT 1 FROM processed WHERE message_id = ?", (message_id,)
                ).fetchone()
                if not seen:
                    result = handle(envelope)
                    db.execute(
                        "INSERT INTO processed (message_id, event, result, processed_at) "
                        "VALUES (?, ?, ?, ?)",
                        (message_id, envelope["event"], result,
                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Rejected as e:
            # Not requeued: the same bytes would fail the same way forever, in a hot loop. Give
            # the queue a dead-letter policy (rabbitmqctl set_policy … dead-letter-exchange) to
            # keep such messages for inspection instead of dropping them.
            ch.basic_nack(method.delivery_tag, requeue=False)
            say(f"rejected {message_id} {e}")
            return
        # Any other failure (the database) is not this message's fault: it propagates, the
        # process exits without acking, and the broker hands the message to the next consumer.
        ch.basic_ack(method.delivery_tag)
        say(f"skipped duplicate {message_id}" if seen else f"processed {message_id} {envelope['event']}")
        handled += 1
        if args.max_messages and handled >= args.max_messages:
            raise Stop

    def on_sigterm(_signum, _frame):
        raise Stop

    signal.signal(signal.SIGTERM, on_sigterm)
    channel.basic_consume(args.queue, on_message, auto_ack=False)
    say(f"ready queue={args.queue} exchange={args.exchange} bindings={','.join(bindings)}")
    try:
        channel.start_consuming()
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        try:
            connection.close()
        except pika.exceptions.AMQPError:
            pass
        db.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pika.exceptions.AMQPError as e:
        print(f"broker: {e!r}", file=sys.stderr)
        sys.exit(1)
    except sqlite3.Error as e:
        print(f"database: {e}", file=sys.stderr)
        sys.exit(1)
