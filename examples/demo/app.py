"""The demo's web app: answers every path with its version.

A release ships this file with a VERSION file beside it. A release that
also ships a file named BROKEN passes its health check for the number of
seconds the file holds, then fails it, the way a release whose database
connections run out after a while would. Reads HOST and PORT from the agent.

A release that ships a file named QUERY runs that SQL on its database
(PGHOST, PGPORT, PGUSER, PGDATABASE, through pgwire.py beside this file) at
each health check, and fails the check while the query fails: code that
reads a column its migration adds is healthy only once the migration ran.
/db answers the query's first value.
"""
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "VERSION")) as f:
    VERSION = f.read().strip()
STARTED = time.monotonic()
BROKEN_AFTER = None
if os.path.exists(os.path.join(HERE, "BROKEN")):
    with open(os.path.join(HERE, "BROKEN")) as f:
        BROKEN_AFTER = float(f.read().strip() or "0")
QUERY = None
if os.path.exists(os.path.join(HERE, "QUERY")):
    with open(os.path.join(HERE, "QUERY")) as f:
        QUERY = f.read().strip()
    import pgwire
DB_LOCK = threading.Lock()
DB = None


def query_value():
    """The first value of QUERY's first row; raises with the database's
    error. One connection, kept, opened again after it broke."""
    global DB
    with DB_LOCK:
        try:
            if DB is None:
                DB = pgwire.Connection()
            rows = DB.query(QUERY)
        except OSError:
            DB = None
            raise
    return rows[0][0] if rows and rows[0] else ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One segment per response: without it headers and body go out in two
    # writes and Nagle's algorithm stalls the second for a delayed ACK.
    disable_nagle_algorithm = True
    wbufsize = 65536

    def log_message(self, fmt, *args):
        pass

    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            if BROKEN_AFTER is not None and time.monotonic() - STARTED >= BROKEN_AFTER:
                self.reply(503, "cannot reach the database")
                return
            if QUERY is not None:
                try:
                    query_value()
                except Exception as error:
                    self.reply(503, "database: %s" % error)
                    return
            self.reply(200, "ok")
        elif self.path == "/db" and QUERY is not None:
            try:
                self.reply(200, query_value())
            except Exception as error:
                self.reply(503, "database: %s" % error)
        else:
            self.reply(200, VERSION)


if __name__ == "__main__":
    address = (os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"]))
    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    print("demo %s listening on %s:%d" % (VERSION, address[0], address[1]), flush=True)
    sys.stdout.flush()
    server.serve_forever()
