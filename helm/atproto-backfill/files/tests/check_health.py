"""`helm test`: every pod behind the release's headless metrics Service answers /healthz.

The Service resolves to one address per pod (producers, workers, consumers, running backfill
Jobs). Each must answer 200 on BACKFILL_METRICS_PORT; the check retries every
BACKFILL_TEST_INTERVAL seconds until BACKFILL_TEST_TIMEOUT, then exits 1 naming what failed.
"""

import os
import socket
import sys
import time
import urllib.error
import urllib.request


def check(service: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The pods' addresses and, for each one not healthy, why."""
    failed: dict[str, str] = {}
    try:
        infos = socket.getaddrinfo(service, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return [], {service: f"no address: {e}"}
    addresses = sorted({str(info[4][0]) for info in infos})
    for address in addresses:
        host = f"[{address}]" if ":" in address else address
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as resp:
                if resp.status != 200:
                    failed[address] = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as e:
            failed[address] = str(e)
    return addresses, failed


def main() -> int:
    service = os.environ["BACKFILL_TEST_SERVICE"]
    port = int(os.environ.get("BACKFILL_METRICS_PORT", "9100"))
    interval = float(os.environ.get("BACKFILL_TEST_INTERVAL", "5"))
    deadline = time.monotonic() + float(os.environ.get("BACKFILL_TEST_TIMEOUT", "180"))
    while True:
        addresses, failed = check(service, port)
        if addresses and not failed:
            print(f"{len(addresses)} pod(s) healthy behind {service}: {', '.join(addresses)}")
            return 0
        if time.monotonic() >= deadline:
            why = failed or {service: "no pod behind the Service"}
            print(f"unhealthy behind {service}: {why}", file=sys.stderr)
            return 1
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
