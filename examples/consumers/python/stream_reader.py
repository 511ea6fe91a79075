#!/usr/bin/env python3
"""Read a RabbitMQ stream of kallina-relay events from an offset, for example again from the
start after a consumer bug.

A stream (`type = "stream"` in the relay's `[[queues]]`) is an append-only log: reading does not
remove anything, so the same events can be read again by any number of readers, each from the
offset it chooses. Each message carries its own offset in the `x-stream-offset` header; keep the
last one processed to resume after it (`--offset N+1`).

    python3 stream_reader.py --queue kallina.history --offset first
    python3 stream_reader.py --queue kallina.history --offset 2026-12-01T09:00:00Z
    python3 stream_reader.py --queue kallina.history --offset 1042

Output: one line per message, `offset <n> <message_id> <event>`; diagnostics on standard error.
"""

import argparse
import datetime
import json
import signal
import sys

import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


class Stop(Exception):
    pass


def offset_argument(text):
    """`first`, `last`, `next`, an offset number, or a time (RFC 3339): what x-stream-offset
    takes. A time starts at the first chunk written at or after it (a chunk holds a batch of
    messages, so a few earlier ones may come first)."""
    if text in ("first", "last", "next"):
        return text
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected first, last, next, an offset number or an RFC 3339 time"
        )
    return moment


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=DEFAULT_URL)
    parser.add_argument("--queue", required=True, help="a stream the relay declares")
    parser.add_argument("--offset", type=offset_argument, default="first")
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument(
        "--max-messages", type=int, default=0, help="exit after this many messages (0: never)"
    )
    args = parser.parse_args()

    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    try:
        # Passive: a stream is declared by the relay (its `[[queues]]`), with its retention.
        channel.queue_declare(args.queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        print(f"the stream `{args.queue}` does not exist ({e.reply_text})", file=sys.stderr)
        return 2
    # A stream requires manual acks and a prefetch: the ack only lets the broker send more, it
    # removes nothing.
    channel.basic_qos(prefetch_count=args.prefetch)
    read = 0

    def on_message(ch, method, properties, body):
        nonlocal read
        offset = (properties.headers or {}).get("x-stream-offset")
        try:
            event = json.loads(body).get("event", "?")
        except ValueError:
            event = "unparsable"
        print(f"offset {offset} {properties.message_id} {event}", flush=True)
        ch.basic_ack(method.delivery_tag)
        read += 1
        if args.max_messages and read >= args.max_messages:
            raise Stop

    def on_sigterm(_signum, _frame):
        raise Stop

    signal.signal(signal.SIGTERM, on_sigterm)
    channel.basic_consume(
        args.queue, on_message, auto_ack=False, arguments={"x-stream-offset": args.offset}
    )
    print(f"ready stream={args.queue} offset={args.offset}", file=sys.stderr, flush=True)
    try:
        channel.start_consuming()
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        try:
            connection.close()
        except pika.exceptions.AMQPError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
