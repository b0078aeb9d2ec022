"""Guest side of the e2e harness: runs commands the host sends over a virtio-serial port.

Installed into the guest image as /usr/local/sbin/e2e-agent and started by e2e-agent.service.
Protocol: one JSON object per line in each direction.  Requests carry an ``id``; every reply
repeats it together with the boot id, so the host can tell replies of an earlier boot (or an
earlier request cut off by a reset) from the one it waits for.

    {"id": 1, "op": "ping"}
    {"id": 2, "op": "run", "argv": [...], "env": {...}, "timeout": 60, "stdin": "text"}

A "run" reply has rc, stdout, stderr (text, undecodable bytes replaced).  The agent runs one
request at a time; "run" requests that must outlive the agent's reply (reboot) are the host's
business: it sends them and waits for a new boot id instead of a reply.
"""

import json
import os
import subprocess
import sys
import time

PORT = "/dev/virtio-ports/org.rhelcvm.agent"
PORT_WAIT_SECONDS = 120


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def handle(request: dict) -> dict:
    reply = {"id": request.get("id"), "boot_id": boot_id()}
    op = request.get("op")
    if op == "ping":
        with open("/proc/uptime") as f:
            reply["uptime"] = float(f.read().split()[0])
        return reply
    if op != "run":
        reply["error"] = "unknown op %r" % op
        return reply
    env = dict(os.environ)
    env.update(request.get("env") or {})
    try:
        proc = subprocess.run(request["argv"], input=(request.get("stdin") or "").encode(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              timeout=request.get("timeout", 120))
        reply.update(rc=proc.returncode, stdout=proc.stdout.decode(errors="replace"),
                     stderr=proc.stderr.decode(errors="replace"))
    except subprocess.TimeoutExpired as e:
        reply.update(rc=-1, stdout="", stderr="timed out after %s s: %r" % (e.timeout, request["argv"]))
    except OSError as e:
        reply.update(rc=-1, stdout="", stderr="cannot run %r: %s" % (request["argv"], e))
    return reply


def open_port() -> int:
    deadline = time.monotonic() + PORT_WAIT_SECONDS
    while not os.path.exists(PORT):
        if time.monotonic() > deadline:
            sys.exit("e2e-agent: %s did not appear" % PORT)
        time.sleep(0.2)
    return os.open(PORT, os.O_RDWR)


def write_all(fd: int, data: bytes) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def main() -> int:
    fd = open_port()
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            # The host end is not connected: the port reads EOF until it is.
            time.sleep(0.2)
            continue
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                request = json.loads(line)
            except ValueError:
                continue  # a partial line left over from a host reconnect
            if not isinstance(request, dict):
                continue
            write_all(fd, json.dumps(handle(request)).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
