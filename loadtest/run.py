#!/usr/bin/env python3
"""credyt-proxy load-test kit: orchestrates the emulator, the proxy, the references (floor,
nginx hop, durable floor) and loadgen on 127.0.0.1, then verifies that nothing was lost.

Run it through `loadtest/run.sh` (which builds the release binaries first). Every phase is
bounded in time and count; every process started here is stopped here (also on error / ^C).
Money is compared exactly: the emulator's JSON numbers are parsed as Decimal, never floats.

Phases (see loadtest/README.md):
  A  capacity: floor, nginx hop, durable floor, proxy (sync=interval), proxy (sync=always) and
     100-event batches, in alternation (A B A B ...) at each concurrency; the proxies run with
     the outbox forwarder held back (request path only), on a bounded burst. The durable floor
     (examples/floor.rs with a folder) answers each request after a group-committed fdatasync
     and nothing else: what durability alone costs on this disk, the bound for sync=always.
  A' drain: both capacity proxies restart with the forwarder on (same outbox dirs: the records
     written in A survive the restart) and drain to Credyt (the emulator).
  B  sustained end to end: proxy + emulator on the server core, forwarder on; events/s counted
     until the outbox is drained again; outbox depth sampled every 0.5 s.
  L  latency: open loop at half the sustained rate, p99 (sync=interval).
  C  coalescing: a hot-customer workload without and with outbox.coalesce_window_ms.
  M  memory: 100,000 distinct end users through one proxy; peak RSS and cached identities.
  V  verification: per customer, emulator charged total == 0.50 USD x acknowledged events.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
BIN = REL / "credyt-proxy"
FLOOR = REL / "examples" / "floor"
LOADGEN = REL / "examples" / "loadgen"
PLATFORM_KEY = "loadtest-platform-key"
PRICE = Decimal("0.50")  # video_promoted, pricing/standard.toml: one fee per event
EVENT_TYPE = "video_promoted"
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"

PROCS = []


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def credyt_id(prefix):
    return prefix + "_4" + "".join(secrets.choice(CROCKFORD) for _ in range(25))


class ProxyFailed(RuntimeError):
    pass


class Proc:
    def __init__(self, name, cmd, cpu, logdir, env=None):
        self.name = name
        self.logf = open(logdir / f"{name}.log", "ab")
        full = (["taskset", "-c", str(cpu)] if cpu is not None else []) + [str(c) for c in cmd]
        self.p = subprocess.Popen(full, stdout=self.logf, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, start_new_session=True)
        self.peak_rss_kib = 0
        PROCS.append(self)

    @property
    def pid(self):
        return self.p.pid

    def rss_kib(self, field="VmRSS"):
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def alive(self):
        return self.p.poll() is None

    def pause(self, paused):
        """SIGSTOP (or SIGCONT) the process group: a paused server uses no CPU, not even for
        background work (the proxy's fjall flushes and compactions), so the slot of another
        target on the shared core measures that target alone."""
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGSTOP if paused else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self, timeout=30):
        if self.alive():
            self.pause(False)
            self.peak_rss_kib = max(self.peak_rss_kib, self.rss_kib("VmHWM"))
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {timeout}s: SIGKILL")
                self.p.kill()
                self.p.wait(10)
        self.logf.close()
        if self in PROCS:
            PROCS.remove(self)


@contextlib.contextmanager
def running_alone(servers, needs):
    """Pauses every one of `servers` not in `needs` for the duration of the block (a measured
    slot), and resumes them all afterwards, also on error."""
    for proc in servers:
        proc.pause(proc not in needs)
    try:
        yield
    finally:
        for proc in servers:
            proc.pause(False)


def stop_all():
    for p in list(reversed(PROCS)):
        try:
            p.stop(timeout=10)
        except Exception as e:  # noqa: BLE001 - best effort cleanup
            print(f"stopping {p.name}: {e}", file=sys.stderr)


def http(method, url, body=None, headers=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def wait_until(check, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def tcp_ready(port):
    def check():
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    return check


# ---------------------------------------------------------------------------------------------
# the world: emulator, tenants, proxies


class World:
    def __init__(self, args, out):
        self.args = args
        self.out = out
        self.srv = args.server_cpu
        self.emu_port = free_port()
        self.tenants = []  # (id, key, account)
        for i in range(args.tenants):
            self.tenants.append((f"lt{i}", "cpk_lt_" + secrets.token_hex(20), credyt_id("acc")))
        # a tenant of its own for the memory phase (100k end users)
        self.tenants.append(("ltmem2", "cpk_lt_" + secrets.token_hex(20), credyt_id("acc")))
        self.tenants.append(("ltmem", "cpk_lt_" + secrets.token_hex(20), credyt_id("acc")))
        seed = {"accounts": [{"id": acc, "name": f"Load tenant {tid}", "external_id": tid}
                             for tid, _, acc in self.tenants]}
        (out / "seed.json").write_text(json.dumps(seed, indent=1))
        lines = []
        for tid, key, acc in self.tenants:
            digest = hashlib.sha256(key.encode()).hexdigest()
            lines.append(
                f'[[tenants]]\nid = "{tid}"\nkey_hashes = ["sha256:{digest}"]\n'
                f'account = "{acc}"\ncreate_customers = true\nforward = "charges"\n'
                f'rate_limit = {{ per_second = 1000000000, burst = 1000000000 }}\n')
        (out / "tenants.toml").write_text("\n".join(lines))
        (out / "keys.txt").write_text("\n".join(k for _, k, _ in self.tenants[:-2]) + "\n")
        (out / "keys-mem.txt").write_text(self.tenants[-1][1] + "\n")
        (out / "keys-mem2.txt").write_text(self.tenants[-2][1] + "\n")
        # (tenant id, user) -> acknowledged events, over every proxy run
        self.acked = {}
        self.unknown = {}
        self.unverified = set()
        self.emulator = None

    def start_emulator(self):
        self.emulator = Proc("emulator", [BIN, "emulator", "--listen", f"127.0.0.1:{self.emu_port}",
                                          "--platform-key", PLATFORM_KEY, "--seed",
                                          self.out / "seed.json", "--workers", "1"],
                             self.srv, self.out, env={"RUST_LOG": "warn"})
        wait_until(lambda: self.emu_get("/_emulator/state") is not None, "emulator")

    def emu_get(self, path):
        _, body = http("GET", f"http://127.0.0.1:{self.emu_port}{path}",
                       headers={"X-CREDYT-API-KEY": PLATFORM_KEY}, timeout=120)
        return body

    def emulator_state(self):
        return json.loads(self.emu_get("/_emulator/state"), parse_float=Decimal, parse_int=Decimal)

    def charge_count(self):
        st = self.emulator_state()
        return sum(int(w["charges"]["count"]) for a in st["accounts"] for c in a["customers"]
                   for w in c["wallet"])

    def proxy(self, name, sync, forwarder, coalesce_ms=0, outbox=None, max_pending=3_000_000,
              ack="durable", extra_outbox=""):
        port, admin = free_port(), free_port()
        outbox = outbox or (self.out / f"outbox-{name}")
        cfg = f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
workers = 1

[log]
format = "json"
filter = "warn"

[credyt]
base_url = "http://127.0.0.1:{self.emu_port}"
api_key = "{PLATFORM_KEY}"

[tenants]
file = "{self.out / 'tenants.toml'}"

[pricing]
dir = "{ROOT / 'pricing'}"

[ingest]
ack = "{ack}"

[outbox]
dir = "{outbox}"
sync = "{sync}"
max_pending = {max_pending}
forwarder = {str(forwarder).lower()}
coalesce_window_ms = {coalesce_ms}
{extra_outbox}

[rate_limit]
per_second = 1000000000
burst = 1000000000
"""
        path = self.out / f"proxy-{name}.toml"
        path.write_text(cfg)
        p = Proc(f"proxy-{name}", [BIN, "serve", "--config", path], self.srv, self.out)
        p.port, p.admin, p.outbox, p.label = port, admin, outbox, name
        def ready():
            if not p.alive():
                tail = (self.out / f"proxy-{name}.log").read_text()[-600:]
                p.stop()
                raise ProxyFailed(f"proxy {name} exited at start: {tail.strip()}")
            return http("GET", f"http://127.0.0.1:{admin}/readyz")[0] == 200
        wait_until(ready, f"proxy {name}", timeout=120)
        return p


def metrics(proxy):
    _, body = http("GET", f"http://127.0.0.1:{proxy.admin}/metrics", timeout=5)
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def depth(proxy):
    return int(metrics(proxy).get("credyt_proxy_outbox_depth", -1))


class Sampler(threading.Thread):
    """Samples outbox depth and RSS of a proxy every 0.5 s while a phase runs."""

    def __init__(self, proxy, t0):
        super().__init__(daemon=True)
        self.proxy, self.t0, self.samples, self.stop_flag = proxy, t0, [], threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                d = depth(self.proxy)
            except (OSError, urllib.error.URLError):
                d = None
            self.samples.append({"t": round(time.time() - self.t0, 2), "depth": d,
                                 "rss_kib": self.proxy.rss_kib()})
            self.stop_flag.wait(0.5)

    def stop(self):
        self.stop_flag.set()
        self.join(5)
        return self.samples


# ---------------------------------------------------------------------------------------------
# load


class Runner:
    def __init__(self, world, args, out):
        self.world, self.args, self.out = world, args, out
        self.slots = []  # every measured slot, in time order
        self.t0 = time.time()
        self.seq = 0

    def load(self, port, label, conns, duration=None, batch=1, rate=None, sweep=False,
             keys="keys.txt", users=None, hot=None, proxy=True, record=True, phase="",
             same_id=False):
        self.seq += 1
        run_id = f"{secrets.token_hex(3)}s{self.seq}"
        cmd = [LOADGEN, "--addr", f"127.0.0.1:{port}", "--keys", self.out / keys,
               "--connections", conns, "--batch", batch, "--users", users or self.args.users,
               "--event-type", EVENT_TYPE, "--run-id", run_id, "--timeout", "30"]
        if duration is not None:
            cmd += ["--duration", duration]
        if rate is not None:
            cmd += ["--rate", f"{rate:.1f}"]
        if sweep:
            cmd += ["--sweep"]
        if same_id:
            cmd += ["--same-id"]
        if hot:
            cmd += ["--hot-users", hot[0], "--hot-share", hot[1]]
        if self.args.load_cpu is not None:
            cmd = ["taskset", "-c", self.args.load_cpu] + cmd
        started = time.time() - self.t0
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                             timeout=(duration or 0) + 600)
        if res.returncode != 0:
            raise RuntimeError(f"loadgen failed: {res.stderr[-2000:]}")
        r = json.loads(res.stdout)
        r.update({"label": label, "phase": phase, "started_s": round(started, 2)})
        tenant_ids = [t[0] for t in self.world.tenants]
        if keys == "keys-mem.txt":
            tenant_ids = [self.world.tenants[-1][0]]
        elif keys == "keys-mem2.txt":
            tenant_ids = [self.world.tenants[-2][0]]
        if same_id:
            self.world.unverified.update(tenant_ids)
        if same_id:
            # one event id for the whole run: the proxy accepts it once and answers the rest
            # as duplicates, so the acknowledged count per customer says nothing about charges:
            # these tenants are left out of the verification (and the report says so)
            proxy = False
            r["note"] = "same event id in every request (duplicates after the first)"
        if proxy:
            for k, n in r["acked"].items():
                ti, u = k.split("/")
                key = (tenant_ids[int(ti)], f"u{u}")
                self.world.acked[key] = self.world.acked.get(key, 0) + n
            for k, n in r["unknown"].items():
                ti, u = k.split("/")
                key = (tenant_ids[int(ti)], f"u{u}")
                self.world.unknown[key] = self.world.unknown.get(key, 0) + n
        r["acked_customers"] = len(r.pop("acked"))
        r["unknown_events"] = sum(r.pop("unknown").values())
        if record:
            self.slots.append(r)
        errs = {**{str(k): v for k, v in r["status"].items() if not str(k).startswith("2")},
                **r["errors"]}
        log(f"  {phase:9} {label:22} c={conns:<3} b={batch:<3} "
            f"{r['requests_per_s']:9.0f} req/s {r['events_per_s']:9.0f} ev/s "
            f"p50 {r['latency_us']['p50'] / 1000:6.2f} p99 {r['latency_us']['p99'] / 1000:7.2f} "
            f"max {r['latency_us']['max'] / 1000:7.1f} ms {errs or ''}")
        return r

    def drain(self, proxy, timeout):
        """Waits until the proxy's outbox is empty; returns (seconds, samples) or raises."""
        t0 = time.time()
        samples = []
        while True:
            d = depth(proxy)
            samples.append({"t": round(time.time() - t0, 2), "depth": d})
            if d == 0:
                return time.time() - t0, samples
            if time.time() - t0 > timeout:
                return None, samples
            time.sleep(0.5)


def median(xs):
    return statistics.median(xs) if xs else 0.0


def summarize(slots, label, conns, batch=1, key="events_per_s"):
    xs = [s[key] for s in slots if s["label"] == label and s["connections"] == conns
          and s["batch"] == batch and s["phase"] == "capacity"]
    return {"runs": [round(x, 1) for x in xs], "median": round(median(xs), 1)}


# ---------------------------------------------------------------------------------------------
# report


def svg_plot(slots, depth_series, path):
    """Events/s and p99 per second over the whole run, plus outbox depth, as one SVG."""
    W, H, L, R = 1100, 640, 70, 20
    panels = [("events/s accepted (per second)", 40, 200), ("p99 latency ms (per second, log)", 280, 150),
              ("outbox depth (sustained phases)", 470, 130)]
    colors = {"floor": "#888", "nginx": "#2a9d8f", "durable-floor": "#5e548e", "proxy-interval": "#e76f51",
              "proxy-always": "#9b2226", "proxy-interval-b100": "#f4a261", "e2e": "#264653",
              "e2e-half-rate": "#8ab17d", "e2e-hot": "#6a4c93", "e2e-hot-coalesced": "#c77dff",
              "memory-sweep": "#bbb", "warm": "#ddd"}
    pts = []
    for s in slots:
        for ps in s["per_second"]:
            pts.append((s["started_s"] + ps["t"], ps["events_ok"], ps["p99_us"] / 1000.0, s["label"]))
    if not pts:
        return
    tmax = max(p[0] for p in pts) + 1
    tmax = max([tmax] + [d["t"] for d in depth_series])
    vmax = max(p[1] for p in pts) or 1
    dmax = max([d["depth"] or 0 for d in depth_series] + [1])
    x = lambda t: L + (W - L - R) * t / tmax  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    import math
    for title, top, h in panels:
        out.append(f'<text x="{L}" y="{top - 8}" font-weight="bold">{title}</text>')
        out.append(f'<rect x="{L}" y="{top}" width="{W - L - R}" height="{h}" fill="none" stroke="#ccc"/>')
    # throughput
    top, h = 40, 200
    for frac in (0, 0.5, 1):
        y = top + h - h * frac
        out.append(f'<text x="{L - 5}" y="{y + 4}" text-anchor="end">{vmax * frac:,.0f}</text>')
    for t, v, p99, label in pts:
        c = colors.get(label, "#000")
        y = top + h - h * v / vmax
        out.append(f'<rect x="{x(t):.1f}" y="{y:.1f}" width="{max(1.0, x(1) - x(0) - 1):.1f}" '
                   f'height="{top + h - y:.1f}" fill="{c}"/>')
    # p99 (log scale 0.1 ms .. 1000 ms)
    top, h = 280, 150
    lo, hi = math.log10(0.1), math.log10(1000)
    for ms in (0.1, 1, 5, 10, 100, 1000):
        y = top + h - h * (math.log10(ms) - lo) / (hi - lo)
        out.append(f'<text x="{L - 5}" y="{y + 4}" text-anchor="end">{ms:g}</text>')
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
    for t, v, p99, label in pts:
        if p99 <= 0:
            continue
        y = top + h - h * (min(max(math.log10(p99), lo), hi) - lo) / (hi - lo)
        out.append(f'<circle cx="{x(t) + 2:.1f}" cy="{y:.1f}" r="2.2" fill="{colors.get(label, "#000")}"/>')
    # depth
    top, h = 470, 130
    out.append(f'<text x="{L - 5}" y="{top + 4}" text-anchor="end">{dmax:,}</text>')
    for d in depth_series:
        if d["depth"] is None:
            continue
        y = top + h - h * d["depth"] / dmax
        out.append(f'<circle cx="{x(d["t"]):.1f}" cy="{y:.1f}" r="1.5" fill="#264653"/>')
    out.append(f'<text x="{W - R}" y="{H - 8}" text-anchor="end">seconds since start (max {tmax:.0f})</text>')
    lx = L
    for label, c in colors.items():
        out.append(f'<rect x="{lx}" y="{H - 28}" width="10" height="10" fill="{c}"/>'
                   f'<text x="{lx + 13}" y="{H - 19}">{label}</text>')
        lx += 13 + 7 * len(label) + 12
    out.append("</svg>")
    path.write_text("\n".join(out))


def ratio(a, b):
    return round(a / b, 3) if b else None


# ---------------------------------------------------------------------------------------------


def remove_outboxes(out):
    """The proxies' outbox folders: verified and drained by now, and gigabytes after a full run
    (they filled this machine's disk once)."""
    for d in out.glob("outbox-*"):
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="report folder (default target/loadtest/<time>)")
    ap.add_argument("--slot", type=float, default=4.0, help="seconds per capacity slot")
    ap.add_argument("--rounds", type=int, default=3, help="A B A B rounds per concurrency")
    ap.add_argument("--conns", default="32,256", help="concurrencies of the capacity phase")
    ap.add_argument("--sustain", type=float, default=15.0, help="seconds of each sustained run")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--users", type=int, default=1000, help="end users per tenant")
    ap.add_argument("--mem-users", type=int, default=100_000, help="end users of the memory phase (0: skip)")
    ap.add_argument("--coalesce-ms", type=int, default=50)
    ap.add_argument("--hot-users", type=int, default=10,
                    help="coalescing phase: hot end users per tenant")
    ap.add_argument("--hot-share", type=float, default=1.0,
                    help="coalescing phase: share of requests on the hot users (1.0: all)")
    ap.add_argument("--drain-timeout", type=float, default=600)
    ap.add_argument("--load-cpu", default="0")
    ap.add_argument("--server-cpu", default="1")
    ap.add_argument("--quick", action="store_true", help="short smoke run (1 round, 2 s slots, no memory phase)")
    ap.add_argument("--keep-outboxes", action="store_true",
                    help="keep the proxies' outbox folders (gigabytes after a full run; removed by default)")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: capacity,sustained,coalesce,memory")
    args = ap.parse_args()
    if args.quick:
        args.slot, args.rounds, args.sustain, args.mem_users, args.conns = 2.0, 1, 5.0, 2000, "32"
    if (os.cpu_count() or 1) < 2:
        log("fewer than 2 cores: not pinning")
        args.load_cpu = args.server_cpu = None
    skip = set(filter(None, args.skip.split(",")))
    for b in (BIN, FLOOR, LOADGEN):
        if not b.exists():
            sys.exit(f"{b} is missing: run loadtest/run.sh (it builds the release binaries)")
    out = args.out or ROOT / "target" / "loadtest" / time.strftime("%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    log(f"report folder {out}")
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "layout": {"load_cpu": args.load_cpu, "server_cpu": args.server_cpu,
                         "nproc": os.cpu_count(), "proxy_workers": 1, "emulator_workers": 1,
                         "nginx_workers": 1, "floor_workers": 1, "durable_floor_workers": 1, "tool": "loadgen (loadtest/loadgen.rs)",
                         "note": "servers under test (proxy, emulator, floor, nginx, durable floor) pinned to server_cpu; "
                                 "loadgen to load_cpu; shared machine: other processes may run"},
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    world = World(args, out)
    runner = Runner(world, args, out)
    depth_series = []
    try:
        world.start_emulator()
        conns_list = [int(c) for c in args.conns.split(",")]

        # ---- A: capacity, references in alternation ----------------------------------------
        if "capacity" not in skip:
            log("phase A: capacity (forwarder held back), A B A B alternation")
            fport = free_port()
            floor = Proc("floor", [FLOOR, f"127.0.0.1:{fport}", "1"], world.srv, out)
            wait_until(tcp_ready(fport), "floor")
            nport = free_port()
            ndir = out / "nginx"
            ndir.mkdir(exist_ok=True)
            conf = (ROOT / "loadtest" / "nginx.conf.template").read_text()
            conf = conf.replace("{{dir}}", str(ndir)).replace("{{port}}", str(nport)) \
                       .replace("{{floor_port}}", str(fport))
            (ndir / "nginx.conf").write_text(conf)
            nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
            nginx = Proc("nginx", [nginx_bin, "-c", ndir / "nginx.conf", "-p", ndir], world.srv, out)
            wait_until(tcp_ready(nport), "nginx")
            dport = free_port()
            dfloor = Proc("durable-floor", [FLOOR, f"127.0.0.1:{dport}", "1", out / "durable-floor"],
                          world.srv, out)
            # it zero-fills its 64 MiB journal and syncs it before the port opens
            wait_until(tcp_ready(dport), "durable floor")
            # Each concurrency gets fresh proxies, and the 100-event batches a proxy of their
            # own: every slot measures a bounded burst on a store holding only that burst's
            # earlier rounds, not the (much larger) debt of flushes and compactions another
            # workload left behind. Every outbox is drained and verified afterwards.
            room = max(3_000_000, 1_000_000 * args.rounds)
            # 100-event requests reach ~300k events/s: room for every round at 500k/s, so no
            # round meets `max_pending` (the seventh session's third rounds did: 503s, not
            # capacity).
            room_b100 = max(room, int(500_000 * args.slot * args.rounds))
            drained_later = []
            for c in conns_list:
                kinds = [("interval", "interval", 1), ("always", "always", 1)] + (
                    [("interval-b100", "interval", 100)] if c == 32 else [])
                procs = {}
                for kind, sync, _ in kinds:
                    p = world.proxy(f"{kind}-c{c}", sync, forwarder=False,
                                    max_pending=room_b100 if kind.endswith("b100") else room)
                    # identity warm-up: every (tenant, user) once
                    runner.load(p.port, "warm", 32, sweep=True, phase="warm", record=False)
                    procs[kind] = p
                tl = [("floor", fport, False, 1, {floor}), ("nginx", nport, False, 1, {nginx, floor}),
                      ("durable-floor", dport, False, 1, {dfloor})]
                tl += [(f"proxy-{kind}", procs[kind].port, True, batch, {procs[kind]})
                       for kind, _, batch in kinds]
                servers = [floor, nginx, dfloor] + list(procs.values())
                for r in range(args.rounds):
                    for label, port, is_proxy, batch, needs in tl:
                        # Only what the slot measures runs: the others are paused, so neither
                        # reference pays for a proxy's deferred background work (which then
                        # runs in that proxy's own slots).
                        with running_alone(servers, needs):
                            runner.load(port, label, c, duration=args.slot, batch=batch,
                                        proxy=is_proxy, phase="capacity")
                for kind, sync, _ in kinds:
                    p = procs[kind]
                    name = f"{kind}-c{c}"
                    report.setdefault("capacity_depth_before_drain", {})[name] = depth(p)
                    report.setdefault("capacity_peak_rss_kib", {})[name] = p.rss_kib("VmHWM")
                    p.stop()
                    drained_later.append((name, sync, p))
            dfloor.stop()
            shutil.rmtree(out / "durable-floor", ignore_errors=True)
            nginx.stop()
            floor.stop()
            log("phase A': drain the capacity outboxes (restart with the forwarder on)")
            drains = {}
            for name, sync, old in drained_later:
                p = world.proxy(f"{name}-drain", sync, forwarder=True, outbox=old.outbox)
                d0 = depth(p)
                secs, samples = runner.drain(p, args.drain_timeout)
                drains[name] = {"depth_after_restart": d0, "seconds": secs and round(secs, 1),
                                "charges_per_s": round(d0 / secs, 1) if secs else None,
                                "drained": secs is not None}
                log(f"  drained {name}: {drains[name]}")
                p.stop()
            report["capacity_drain"] = drains
            # Verify the capacity stage now, then give the later phases a fresh emulator (its
            # state grows with every charge and shares the server core with the proxy).
            log("phase V1: verify the capacity stage, then reset the emulator")
            report.setdefault("verification_stages", {})["capacity"] = v1 = verify(world)
            log(f"  verification: {json.dumps({k: v for k, v in v1.items() if k != 'mismatches'})}")
            http("POST", f"http://127.0.0.1:{world.emu_port}/_emulator/reset",
                 headers={"X-CREDYT-API-KEY": PLATFORM_KEY}, timeout=120)
            world.acked, world.unknown = {}, {}

        # ---- B: sustained end to end ------------------------------------------------------
        e2e_rate = None
        if "sustained" not in skip:
            log("phase B: sustained end to end (forwarder on), then L: p99 at half rate")
            for name, hot, coalesce in [("e2e", None, 0)] + (
                    [] if "coalesce" in skip else
                    [("e2e-hot", (args.hot_users, args.hot_share), 0),
                     ("e2e-hot-coalesced", (args.hot_users, args.hot_share), args.coalesce_ms)]):
                try:
                    p = world.proxy(name, "interval", forwarder=True, coalesce_ms=coalesce)
                except ProxyFailed as e:
                    report.setdefault("sustained", {})[name] = {"not_measurable": str(e)}
                    log(f"  {name}: NOT MEASURABLE: {e}")
                    continue
                runner.load(p.port, "warm", 32, sweep=True, phase="warm", record=False)
                d, _ = runner.drain(p, args.drain_timeout)
                charges0 = world.charge_count()
                t_start = time.time()
                sampler = Sampler(p, runner.t0)
                sampler.start()
                r = runner.load(p.port, name, 32, duration=args.sustain, hot=hot, phase="sustained")
                secs, _ = runner.drain(p, args.drain_timeout)
                samples = sampler.stop()
                depth_series += samples
                total = time.time() - t_start
                charges = world.charge_count() - charges0
                res = {"connections": 32, "ingest_events_per_s": round(r["events_per_s"], 1),
                       "events": r["events_ok"], "drain_after_s": secs and round(secs, 1),
                       "end_to_end_events_per_s": round(r["events_ok"] / total, 1) if secs is not None else None,
                       "max_outbox_depth": max([s["depth"] or 0 for s in samples] + [0]),
                       "upstream_charges": charges,
                       "charges_per_event": round(charges / r["events_ok"], 4) if r["events_ok"] else None,
                       "latency_us": r["latency_us"], "peak_rss_kib": p.rss_kib("VmHWM"),
                       "hot_workload": hot, "coalesce_window_ms": coalesce}
                report.setdefault("sustained", {})[name] = res
                log(f"  {name}: {res}")
                if name == "e2e" and res["end_to_end_events_per_s"]:
                    e2e_rate = res["end_to_end_events_per_s"]
                    half = e2e_rate / 2
                    sampler = Sampler(p, runner.t0)
                    sampler.start()
                    rl = runner.load(p.port, "e2e-half-rate", 32, duration=args.sustain, rate=half,
                                     phase="latency")
                    runner.drain(p, args.drain_timeout)
                    depth_series += sampler.stop()
                    report["half_rate_latency"] = {"rate": round(half, 1), "connections": 32,
                                                   "achieved_events_per_s": round(rl["events_per_s"], 1),
                                                   "latency_us": rl["latency_us"], "open_loop": True,
                                                   "loadgen_send_lag_us": rl.get("send_lag_us")}
                p.stop()

        # ---- M: memory with many cached identities ----------------------------------------
        if args.mem_users > 0 and "memory" not in skip:
            log(f"phase M: {args.mem_users} end users through one proxy (peak RSS)")
            p = world.proxy("memory", "interval", forwarder=True)
            rss0 = p.rss_kib()
            runner.load(p.port, "memory-sweep", 64, sweep=True, keys="keys-mem.txt",
                        users=args.mem_users, phase="memory")
            secs, _ = runner.drain(p, args.drain_timeout)
            m = metrics(p)
            report["memory"] = {"end_users": args.mem_users,
                                "cached_identities": int(m.get("credyt_proxy_identity_cached_customers", -1)),
                                "rss_start_kib": rss0, "rss_now_kib": p.rss_kib(),
                                "peak_rss_kib": p.rss_kib("VmHWM"), "drained": secs is not None}
            log(f"  memory: {report['memory']}")
            p.stop()
            # identity only: the same end users, but every request carries the same event id
            # (a duplicate after the first), so nothing per event is stored: what 100,000
            # cached identities cost. The one accepted event is charged; it is not verified
            # per customer (see Runner.load), the sweep's other events are duplicates.
            p = world.proxy("memory-identity", "interval", forwarder=True)
            rss0 = p.rss_kib()
            runner.load(p.port, "memory-sweep", 64, sweep=True, keys="keys-mem2.txt",
                        users=args.mem_users, phase="memory", same_id=True)
            m = metrics(p)
            report["memory_identity_only"] = {
                "end_users": args.mem_users,
                "cached_identities": int(m.get("credyt_proxy_identity_cached_customers", -1)),
                "rss_start_kib": rss0, "peak_rss_kib": p.rss_kib("VmHWM")}
            log(f"  memory (identity only): {report['memory_identity_only']}")
            p.stop()

        # ---- V: verification --------------------------------------------------------------
        log("phase V: verify emulator charges == acknowledged events x 0.50 USD, per customer")
        stages = report.setdefault("verification_stages", {})
        stages["sustained+memory"] = verify(world)
        log(f"  verification: {json.dumps({k: v for k, v in stages['sustained+memory'].items() if k != 'mismatches'})}")
        report["verification"] = {
            "exact_match": all(v["exact_match"] for v in stages.values()),
            "acknowledged_events": sum(v["acknowledged_events"] for v in stages.values()),
            "unknown_outcome_events": sum(v["unknown_outcome_events"] for v in stages.values()),
            "customers": sum(v["customers"] for v in stages.values()),
            "charges": sum(v["charges"] for v in stages.values()),
            "expected_total_usd": str(sum(Decimal(v["expected_total_usd"]) for v in stages.values())),
            "charged_total_usd": str(sum(Decimal(v["charged_total_usd"]) for v in stages.values())),
        }
    finally:
        stop_all()
        if not args.keep_outboxes:
            remove_outboxes(out)

    report["emulator_peak_rss_kib"] = world.emulator.peak_rss_kib if world.emulator else None
    report["figures"] = figures(runner.slots, conns_list if "capacity" not in skip else [], report)
    report["slots"] = runner.slots
    report["outbox_depth_samples"] = depth_series
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    svg_plot(runner.slots, depth_series, out / "report.svg")
    print_summary(report, out)
    ok = report["verification"]["exact_match"]
    sys.exit(0 if ok else 1)


def verify(world):
    st = world.emulator_state()
    by_account = {a["id"]: a for a in st["accounts"]}
    charged = {}
    counts = {}
    for tid, _, acc in world.tenants:
        if tid in world.unverified:
            continue
        a = by_account.get(acc)
        if not a:
            continue
        for c in a["customers"]:
            for w in c["wallet"]:
                if w["asset"] != "USD":
                    continue
                key = (tid, c.get("external_id"))
                charged[key] = charged.get(key, Decimal(0)) + w["charges"]["total"]
                counts[key] = counts.get(key, 0) + int(w["charges"]["count"])
    mismatches = []
    keys = set(charged) | {k for k in world.acked if k[0] not in world.unverified}
    expected_total = Decimal(0)
    charged_total = Decimal(0)
    for k in sorted(keys, key=lambda k: (k[0], str(k[1]))):
        exp = PRICE * world.acked.get(k, 0)
        got = charged.get(k, Decimal(0))
        expected_total += exp
        charged_total += got
        if exp != got:
            mismatches.append({"tenant": k[0], "user": k[1], "expected": str(exp), "charged": str(got),
                               "unknown_events": world.unknown.get(k, 0)})
    return {"customers": len(keys), "acknowledged_events": sum(world.acked.values()),
            "unknown_outcome_events": sum(world.unknown.values()),
            "expected_total_usd": str(expected_total), "charged_total_usd": str(charged_total),
            "charges": sum(counts.values()), "mismatched_customers": len(mismatches),
            "exact_match": not mismatches, "mismatches": mismatches[:50],
            "tenants_not_verified": sorted(world.unverified)}


def figures(slots, conns_list, report):
    figs = {}
    for c in conns_list:
        labels = ("floor", "nginx", "durable-floor", "proxy-interval", "proxy-always")
        f = {lab: summarize(slots, lab, c) for lab in labels}
        if c == 32:
            f["proxy-interval-b100"] = summarize(slots, "proxy-interval-b100", c, batch=100)
        for lab in labels:
            rs = [s for s in slots if s["label"] == lab and s["connections"] == c and s["phase"] == "capacity"]
            if rs:
                f[lab]["p50_ms"] = round(median([s["latency_us"]["p50"] for s in rs]) / 1000, 3)
                f[lab]["p99_ms"] = round(median([s["latency_us"]["p99"] for s in rs]) / 1000, 3)
                f[lab]["max_ms"] = round(max(s["latency_us"]["max"] for s in rs) / 1000, 3)
                f[lab]["errors"] = sum(sum(v for k, v in s["status"].items() if not str(k).startswith("2"))
                                       + sum(s["errors"].values()) for s in rs)
        fl, ng, dfl = f["floor"]["median"], f["nginx"]["median"], f["durable-floor"]["median"]
        for lab in list(f):
            f[lab]["x_floor"] = ratio(f[lab]["median"], fl)
            f[lab]["x_nginx"] = ratio(f[lab]["median"], ng)
            f[lab]["x_durable_floor"] = ratio(f[lab]["median"], dfl)
            # paired: each round's slot over the same round's reference slot (they ran seconds
            # apart), median over rounds: less exposed to the machine's drift than x_floor
            runs, fr, nr = f[lab]["runs"], f["floor"]["runs"], f["nginx"]["runs"]
            dr = f["durable-floor"]["runs"]
            f[lab]["paired_x_floor"] = round(median([a / b for a, b in zip(runs, fr) if b]), 3)
            f[lab]["paired_x_nginx"] = round(median([a / b for a, b in zip(runs, nr) if b]), 3)
            f[lab]["paired_x_durable_floor"] = round(median([a / b for a, b in zip(runs, dr) if b]), 3)
        figs[f"c{c}"] = f
    s = report.get("sustained", {})
    nginx32 = figs.get("c32", {}).get("nginx", {}).get("median")
    floor32 = figs.get("c32", {}).get("floor", {}).get("median")
    if "e2e" in s and s["e2e"]["end_to_end_events_per_s"]:
        s["e2e"]["x_nginx_c32"] = ratio(s["e2e"]["end_to_end_events_per_s"], nginx32)
        s["e2e"]["x_floor_c32"] = ratio(s["e2e"]["end_to_end_events_per_s"], floor32)
    if "e2e-hot" in s and "e2e-hot-coalesced" in s:
        a = s["e2e-hot"].get("end_to_end_events_per_s")
        b = s["e2e-hot-coalesced"].get("end_to_end_events_per_s")
        figs["coalescing_speedup"] = ratio(b, a) if a and b else None
    if "c32" in figs:
        b100 = figs["c32"]["proxy-interval-b100"]["median"]
        figs["batch100_x_single"] = ratio(b100, figs["c32"]["proxy-interval"]["median"])
    return figs


def print_summary(report, out):
    print("\n==== credyt-proxy load test ====")
    print(f"layout: loadgen on cpu {report['layout']['load_cpu']}, servers on cpu "
          f"{report['layout']['server_cpu']}; 1 proxy worker, 1 nginx worker, 1 floor worker, "
          f"1 durable floor worker")
    for key, f in report["figures"].items():
        if not isinstance(f, dict):
            print(f"{key}: {f}")
            continue
        print(f"\ncapacity at {key[1:]} connections (events/s, median of rounds; ratios to "
              f"floor / nginx / durable floor):")
        for lab, v in f.items():
            print(f"  {lab:22} {v['median']:10.0f}  x_floor {v['x_floor']} (paired {v['paired_x_floor']})"
                  f"  x_nginx {v['x_nginx']} (paired {v['paired_x_nginx']})"
                  f"  x_durable_floor {v['x_durable_floor']} (paired {v['paired_x_durable_floor']})"
                  f"  p50 {v.get('p50_ms', '-')} p99 {v.get('p99_ms', '-')} max {v.get('max_ms', '-')} ms"
                  f"  errors {v.get('errors', '-')}  runs {v['runs']}")
    for name, s in report.get("sustained", {}).items():
        print(f"\nsustained {name}: {json.dumps(s)}")
    if "half_rate_latency" in report:
        print(f"\nhalf-rate latency: {json.dumps(report['half_rate_latency'])}")
    for k in ("capacity_drain", "memory", "memory_identity_only", "emulator_peak_rss_kib"):
        if k in report:
            print(f"\n{k}: {json.dumps(report[k])}")
    v = report["verification"]
    print(f"\nverification: {'EXACT MATCH' if v['exact_match'] else 'MISMATCH'} "
          f"({v['acknowledged_events']} acknowledged events, {v['customers']} customers, "
          f"expected {v['expected_total_usd']} USD, charged {v['charged_total_usd']} USD in "
          f"{v['charges']} charges, {v['unknown_outcome_events']} events of unknown outcome)")
    print(f"\nreport: {out / 'report.json'}  plot: {out / 'report.svg'}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
