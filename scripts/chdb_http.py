#!/usr/bin/env python3
"""TEST SUPPORT ONLY: a current ClickHouse engine (PyPI's chdb-core) behind a
small HTTP front end, so that pg2ch's tests can run against ClickHouse 26.x on
machines where no current clickhouse-server can be installed.

chdb runs the real ClickHouse engine in-process but opens no network port.
This serves the subset of ClickHouse's HTTP interface that the `clickhouse`
crate and pg2ch use, on loopback only:

- `GET /ping` answers `Ok.`;
- `POST /` with the SQL as the body (`database=` and `default_format=` in the
  URL) runs it and answers the result in that format;
- `POST /?query=INSERT INTO t(cols) FORMAT RowBinary` with the rows as the
  body (in ClickHouse's compressed block framing when `decompress=1`) writes
  the body to a file and runs `INSERT ... FROM INFILE`: binary data inside the
  query text is unreliable in chdb. Settings in the URL (`async_insert=0`)
  go into the INSERT's SETTINGS clause and are recorded, one JSON line per
  insert, in `<path>/inserts.log`, so tests can assert what pg2ch pinned;
- users: one, whose password is read from a file (never from argv); the
  crate's `X-ClickHouse-User`/`X-ClickHouse-Key` headers are checked;
- errors come back as ClickHouse's do: HTTP 500 (403 for a refused
  password) with `Code: N. DB::Exception: ...` as the body.

Every query runs under one lock: the engine is shared, the tests are small.
pg2ch itself never uses this: it talks to ClickHouse through the crate only.

Usage: chdb_http.py --port P --path DIR --user U --password-file F
"""

import argparse
import json
import os
import re
import struct
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlparse

import lz4.block
from chdb import session

# URL parameters that are not settings.
NOT_SETTINGS = {"query", "database", "default_format", "decompress", "compress", "user", "password",
                "enable_http_compression", "session_id", "session_timeout", "query_id", "role"}
SAFE_SETTING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def decompress_blocks(data: bytes) -> bytes:
    """ClickHouse's compressed framing: per block a 16-byte checksum (not
    checked here: loopback), a method byte, the compressed size (with the
    9-byte header) and the decompressed size, then the payload."""
    out, at = [], 0
    while at < len(data):
        method = data[at + 16]
        size, raw = struct.unpack_from("<II", data, at + 17)
        payload = data[at + 25:at + 16 + size]
        if method == 0x82:
            out.append(lz4.block.decompress(payload, uncompressed_size=raw))
        elif method == 0x02:
            out.append(payload)
        else:
            raise ValueError(f"compression method {method:#x} is not supported by the test front end")
        at += 16 + size
    return b"".join(out)


class Engine:
    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.session = session.Session(os.path.join(path, "data"))
        self.inserts_log = os.path.join(path, "inserts.log")

    def run(self, sql: str, database: str, fmt: str) -> bytes:
        with self.lock:
            if database:
                self.session.query(f"USE `{database}`")
            result = self.session.query(sql, fmt)
            return result.bytes() if result is not None else b""

    def insert(self, sql: str, body: bytes, database: str, settings: dict) -> None:
        match = re.match(r"(?is)^\s*(INSERT\s+INTO\s+.*?)\s+FORMAT\s+(\w+)\s*$", sql)
        if not match:
            raise ValueError(f"Code: 62. DB::Exception: the test front end cannot run {sql[:80]!r} with data")
        head, fmt = match.groups()
        clause = ", ".join(f"{k}={v}" for k, v in settings.items())
        with tempfile.NamedTemporaryFile(dir=self.path, prefix="insert-", delete=False) as f:
            f.write(body)
            name = f.name
        try:
            statement = f"{head} FROM INFILE '{name}'" + (f" SETTINGS {clause}" if clause else "") + f" FORMAT {fmt}"
            self.run(statement, database, "TabSeparated")
        finally:
            os.unlink(name)
        with self.lock, open(self.inserts_log, "a") as log:
            log.write(json.dumps({"database": database, "query": sql, "settings": settings}) + "\n")


def make_handler(engine: Engine, user: str, password: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def reply(self, status: int, body: bytes, code: int = 0):
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            if code:
                self.send_header("X-ClickHouse-Exception-Code", str(code))
            self.end_headers()
            self.wfile.write(body)

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_GET(self):
            if urlparse(self.path).path == "/ping":
                self.reply(200, b"Ok.\n")
            else:
                self.reply(404, b"Code: 0. DB::Exception: only /ping is served by GET\n")

        def do_POST(self):
            params = dict(parse_qsl(urlparse(self.path).query, keep_blank_values=True))
            body = self.body()
            who = self.headers.get("X-ClickHouse-User") or params.get("user") or "default"
            key = self.headers.get("X-ClickHouse-Key") or params.get("password") or ""
            if who != user or key != password:
                msg = f"Code: 516. DB::Exception: {who}: Authentication failed: password is incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)\n"
                return self.reply(403, msg.encode(), 516)
            database = params.get("database", "")
            fmt = params.get("default_format", "TabSeparated")
            settings = {k: v for k, v in params.items()
                        if k not in NOT_SETTINGS and not k.startswith("param_")}
            try:
                bad = [k for k, v in settings.items() if not SAFE_SETTING.match(k) or not re.match(r"^[\w.]*$", v)]
                if bad:
                    raise ValueError(f"Code: 115. DB::Exception: unsupported setting {bad[0]!r} (UNKNOWN_SETTING)")
                if "query" in params:
                    data = decompress_blocks(body) if params.get("decompress") == "1" else body
                    engine.insert(params["query"], data, database, settings)
                    out = b""
                else:
                    out = engine.run(body.decode("utf-8"), database, fmt)
            except Exception as e:  # noqa: BLE001 - every engine error goes back to the client
                text = str(e).split("RuntimeError: ")[0].strip()
                code = re.search(r"Code: (\d+)", text)
                return self.reply(500, (text + "\n").encode(), int(code.group(1)) if code else 1)
            self.reply(200, out)

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--user", default="default")
    parser.add_argument("--password-file")
    args = parser.parse_args()
    password = ""
    if args.password_file:
        with open(args.password_file) as f:
            password = f.read().strip()
    os.makedirs(args.path, mode=0o700, exist_ok=True)
    engine = Engine(args.path)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(engine, args.user, password))
    server.daemon_threads = True
    print(f"chdb {engine.run('SELECT version()', '', 'TabSeparated').decode().strip()} "
          f"serving ClickHouse HTTP on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
