#!/usr/bin/env python3
"""A/B two proxy binaries on the request path (what a hot-path change bought).

    python3 loadtest/ab.py /tmp/before /tmp/after [--rounds 5] [--slot 4] [--conns 32] [--batch 1] [--e2e]

Both binaries serve at once (ack=durable, sync=interval, forwarder held back, one worker,
pinned with the emulator to the server core) against the same emulator and tenants; loadgen
(pinned to the load core) alternates A B A B ... and the medians are compared.

With --e2e the forwarder is on (every fee charged to the emulator, which shares the server
core) and each slot's rate is acknowledged events / (slot + time until the outbox drained), as
in the kit's sustained phase. The emulator and loadgen are the binaries run.py would use (in
$CARGO_TARGET_DIR/release, else target/release).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slot", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--sync", default="interval")
    ap.add_argument("--batch", type=int, default=1, help="events per request")
    ap.add_argument("--e2e", action="store_true", help="forwarder on, rate counted until drained")
    ap.add_argument("--load-cpu", default="0")
    ap.add_argument("--server-cpu", default="1")
    args = ap.parse_args()
    out = run.ROOT / "target" / "loadtest" / ("ab-" + time.strftime("%Y%m%dT%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    wargs = argparse.Namespace(server_cpu=args.server_cpu, load_cpu=args.load_cpu, tenants=8, users=1000)
    world = run.World(wargs, out)
    runner = run.Runner(world, wargs, out)
    res = {"A": [], "B": []}
    try:
        world.start_emulator()
        procs = {}
        for name, binary in (("A", args.a), ("B", args.b)):
            run.BIN = binary
            procs[name] = world.proxy(name, args.sync, forwarder=args.e2e)
            runner.load(procs[name].port, "warm", 32, sweep=True, phase="warm", record=False)
        for _ in range(args.rounds):
            for name in ("A", "B"):
                t_start = time.time()
                # The other build is paused (SIGSTOP) so its background work (flushes,
                # compactions) is not charged to this one's slot.
                with run.running_alone(list(procs.values()), {procs[name]}):
                    r = runner.load(procs[name].port, f"{name} {procs[name].label}", args.conns,
                                    duration=args.slot, batch=args.batch, phase="ab")
                if args.e2e:
                    secs, _ = runner.drain(procs[name], 120)
                    if secs is None:
                        sys.exit(f"{name} did not drain within 120 s")
                    r["events_per_s"] = r["events_ok"] / (time.time() - t_start)
                    print(f"  {name} end to end {r['events_per_s']:.0f} ev/s (drain {secs:.1f} s)")
                res[name].append(r)
    finally:
        run.stop_all()
        run.remove_outboxes(out)
    for name, binary in (("A", args.a), ("B", args.b)):
        ev = [r["events_per_s"] for r in res[name]]
        p99 = [r["latency_us"]["p99"] / 1000 for r in res[name]]
        print(f"{name} {binary}: median {statistics.median(ev):.0f} ev/s runs {[round(x) for x in ev]} "
              f"p99 median {statistics.median(p99):.2f} ms")
    a = statistics.median(r["events_per_s"] for r in res["A"])
    b = statistics.median(r["events_per_s"] for r in res["B"])
    print(f"B/A = {b / a:.3f}")


if __name__ == "__main__":
    main()
