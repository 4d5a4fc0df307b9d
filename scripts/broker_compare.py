#!/usr/bin/env python3
"""Measures a running Kafka-API broker with clients nobody here wrote, for
the broker comparison in docs/broker.md.

Usage: scripts/broker_compare.py BOOTSTRAP BROKER_PID

Prints one JSON object: kcat's -L, -P and -C (librdkafka); kafka-python's
produce and fetch rates, a consumer group's read of a whole topic; raw fetches: how long a
waiting fetch takes to hand over a record produced meanwhile, what short
and zero waits answer; and the
broker's resident memory before and after 200 topics of 4 partitions.
Needs `kcat` (Debian) and `kafka-python` (PyPI). Run it against a broker
started empty, as scripts/broker_compare.sh does.
"""
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

BOOTSTRAP, PID = sys.argv[1], int(sys.argv[2])
RUN = str(os.getpid())
MESSAGES = 50_000
PAYLOAD = b"x" * 100


def rss_kib():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for process {PID}")


def kcat(args, data=b""):
    out = subprocess.run(["timeout", "30", "kcat", "-b", BOOTSTRAP, *args], input=data, capture_output=True)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


def raw_fetch(topic, offset, wait_ms):
    """One Fetch v4 of partition 0 at `offset`; returns (milliseconds until
    the answer, bytes of records in it)."""
    import socket
    import struct

    name = topic.encode()
    body = struct.pack(">iiiib", -1, wait_ms, 1, 1 << 20, 0)
    body += struct.pack(">i", 1) + struct.pack(">h", len(name)) + name
    body += struct.pack(">i", 1) + struct.pack(">iqi", 0, offset, 1 << 20)
    header = struct.pack(">hhi", 1, 4, 7) + struct.pack(">h", 3) + b"cmp"
    host, port = BOOTSTRAP.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        s.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
        size = struct.unpack(">i", recv(s, 4))[0]
        answer = recv(s, size)
        took = (time.monotonic() - start) * 1000
    # correlation, throttle, topics count, topic name, partitions count,
    # partition, error, high watermark, last stable offset, aborted, records
    at = 4 + 4 + 4
    if struct.unpack(">i", answer[8:12])[0] == 0:
        return took, 0
    at += 2 + struct.unpack(">h", answer[at : at + 2])[0] + 4 + 4 + 2 + 8 + 8
    aborted = struct.unpack(">i", answer[at : at + 4])[0]
    at += 4 + max(aborted, 0) * 16
    return took, max(struct.unpack(">i", answer[at : at + 4])[0], 0)


def recv(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("the broker closed the connection")
        data += chunk
    return data


def create(admin, name, partitions):
    admin.create_topics([NewTopic(name, partitions, 1)])


def attempt(results, name, fn):
    """Runs one measurement; a failure is recorded, not fatal."""
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - the comparison records what fails
        results[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"


def main():
    results = {"rss_kib_start": rss_kib()}
    admin = KafkaAdminClient(bootstrap_servers=BOOTSTRAP, request_timeout_ms=10_000)

    # kcat (librdkafka).
    topic = f"cmp-kcat-{RUN}"
    create(admin, topic, 1)
    rc, out, err = kcat(["-L"])
    results["kcat -L"] = "ok" if rc == 0 and topic in out else f"failed: {err.strip().splitlines()[-1:]}"
    rc, _, err = kcat(["-P", "-t", topic, "-k", "k1", "-H", "h=v"], b"v1\nv2\n")
    results["kcat -P"] = "ok" if rc == 0 else f"failed: {err.strip().splitlines()[-1:]}"
    rc, out, err = kcat(["-C", "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%k|%h|%s\\n"])
    want = "k1|h=v|v1\nk1|h=v|v2\n"
    results["kcat -C"] = "ok" if rc == 0 and out == want else f"failed: {out!r} {err.strip().splitlines()[-1:]}"

    # kafka-python: produce, then fetch the whole topic without a group.
    topic = f"cmp-rate-{RUN}"
    create(admin, topic, 4)

    def produce():
        producer = KafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5, batch_size=256 * 1024)
        start = time.monotonic()
        for i in range(MESSAGES):
            producer.send(topic, key=str(i).encode(), value=PAYLOAD)
        producer.flush(timeout=120)
        producer.close()
        return round(MESSAGES / (time.monotonic() - start))

    attempt(results, "kafka-python produce msg/s", produce)

    def fetch():
        consumer = KafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
        parts = [TopicPartition(topic, p) for p in range(4)]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        start, n = time.monotonic(), 0
        while n < MESSAGES and time.monotonic() - start < 120:
            n += sum(len(v) for v in consumer.poll(timeout_ms=1000, max_records=10_000).values())
        consumer.close()
        assert n == MESSAGES, f"read {n} of {MESSAGES}"
        return round(n / (time.monotonic() - start))

    attempt(results, "kafka-python fetch msg/s", fetch)

    def group():
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=BOOTSTRAP,
            group_id=f"cmp-group-{RUN}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        start, n = time.monotonic(), 0
        while n < MESSAGES and time.monotonic() - start < 60:
            n += sum(len(v) for v in consumer.poll(timeout_ms=1000, max_records=10_000).values())
        consumer.commit()
        consumer.close()
        return f"read {n} of {MESSAGES}, committed" if n == MESSAGES else f"failed: read {n} of {MESSAGES} in 60 s"

    attempt(results, "kafka-python group read", group)

    # Raw fetches (Fetch v4, as a client sends them): how a waiting fetch
    # hands over a record produced meanwhile, what a short or zero wait
    # answers when records are there, and what an empty fetch costs.
    topic = f"cmp-wake-{RUN}"
    create(admin, topic, 1)

    def waits():
        producer = KafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=0)
        producer.send(topic, value=PAYLOAD).get(timeout=10)
        end = 1
        handed_over, found, empty = [], {}, []
        for _ in range(11):
            timer = threading.Timer(0.02, lambda: producer.send(topic, value=PAYLOAD).get(timeout=10))
            timer.start()
            took, size = raw_fetch(topic, end, 500)
            timer.join()
            handed_over.append(took)
            end += 1
        for wait in (0, 1, 4):
            answers = [raw_fetch(topic, 0, wait)[1] > 0 for _ in range(20)]
            found[f"{wait} ms"] = f"{sum(answers)} of 20 with records"
        for _ in range(11):
            empty.append(raw_fetch(topic, end + 1000, 4)[0])
        producer.close()
        return {
            "record produced 20 ms into a 500 ms wait: answered after ms (median)": round(statistics.median(handed_over)),
            "records there, fetch with a wait of": found,
            "nothing there, 4 ms wait: answered after ms (median)": round(statistics.median(empty), 1),
        }

    attempt(results, "fetch waits", waits)

    # Resident memory over many topics.
    def topics():
        before = rss_kib()
        producer = KafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
        for i in range(200):
            name = f"cmp-many-{RUN}-{i}"
            create(admin, name, 4)
            producer.send(name, value=PAYLOAD)
        producer.flush(timeout=60)
        producer.close()
        return {"before": before, "after": rss_kib()}

    attempt(results, "rss_kib 200 topics", topics)
    admin.close()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
