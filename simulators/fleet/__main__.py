"""python -m simulators.fleet --port 8701 --devices 300 --seed 1"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from simulators.fleet.server import make_server


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.fleet")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--power-delay-s", type=float, default=5.0)
    args = parser.parse_args()
    server, _ = make_server(
        args.host, args.port, devices_count=args.devices, seed=args.seed, power_delay_s=args.power_delay_s
    )

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = f"http://{args.host}:{server.server_address[1]}"
    print(f"fleet simulator listening on {url} ({args.devices} devices)", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
