"""A minimal PostgreSQL client for the demo app (Python has none built in):
one connection over TCP, trust authentication, the simple query protocol,
every value as text. It connects where psql would: PGHOST, PGPORT, PGUSER,
PGDATABASE.
"""
import os
import socket
import struct


class PgError(Exception):
    """An error the server reported; the connection stays usable (a broken
    connection raises OSError)."""


class Connection:
    def __init__(self):
        host = os.environ.get("PGHOST", "127.0.0.1")
        port = int(os.environ.get("PGPORT", "5432"))
        user = os.environ.get("PGUSER", "postgres")
        database = os.environ.get("PGDATABASE", user)
        self.sock = socket.create_connection((host, port), timeout=5)
        params = b"user\0%s\0database\0%s\0\0" % (user.encode(), database.encode())
        # Protocol 3.0.
        self.sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        while True:
            kind, body = self._read()
            if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise PgError("the server wants a password; the demo's database trusts loopback")
            if kind == b"E":
                raise PgError(_error_text(body))
            if kind == b"Z":
                return

    def query(self, sql):
        """Runs `sql`; returns its rows (tuples of str or None)."""
        data = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", 4 + len(data)) + data)
        rows, error = [], None
        while True:
            kind, body = self._read()
            if kind == b"D":
                columns, offset, row = struct.unpack("!h", body[:2])[0], 2, []
                for _ in range(columns):
                    size = struct.unpack("!i", body[offset:offset + 4])[0]
                    offset += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(body[offset:offset + size].decode())
                        offset += size
                rows.append(tuple(row))
            elif kind == b"E":
                error = _error_text(body)
            elif kind == b"Z":
                if error is not None:
                    raise PgError(error)
                return rows

    def close(self):
        self.sock.close()

    def _read(self):
        head = self._exactly(5)
        size = struct.unpack("!i", head[1:])[0]
        return head[:1], self._exactly(size - 4)

    def _exactly(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data


def _error_text(body):
    """The message field (M) of an ErrorResponse."""
    for field in body.split(b"\0"):
        if field[:1] == b"M":
            return field[1:].decode(errors="replace")
    return "unknown error"
