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
  W  WAN: the forwarder against a distant Credyt (emulator latency and faults): 0 ms and 50 ms
     at an open-loop offered load, 50 ms with a slow tail (2% of calls at 5 s), 50 ms with 20%
     answered 429; delivered charges/s against the Little's-law bound; then CPU per event of
     ingest + forward against the nginx hop's CPU per request. Each scenario has a fresh proxy
     and a reset emulator, and is verified once drained.
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
# Where `cargo build --release` put the binaries (run.sh honours CARGO_TARGET_DIR; --bin-dir
# overrides, e.g. a private copy that another build in a shared target folder cannot replace
# while a run is under way).
REL = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "release"
BIN = REL / "credyt-proxy"
FLOOR = REL / "examples" / "floor"
LOADGEN = REL / "examples" / "loadgen"


def set_bin_dir(rel):
    global REL, BIN, FLOOR, LOADGEN
    REL = Path(rel)
    BIN, FLOOR, LOADGEN = REL / "credyt-proxy", REL / "examples" / "floor", REL / "examples" / "loadgen"
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

    def start_emulator(self, cpu="server", name="emulator"):
        self.emulator = Proc(name, [BIN, "emulator", "--listen", f"127.0.0.1:{self.emu_port}",
                                    "--platform-key", PLATFORM_KEY, "--seed",
                                    self.out / "seed.json", "--workers", "1"],
                             self.srv if cpu == "server" else cpu, self.out, env={"RUST_LOG": "warn"})
        wait_until(lambda: self.emu_get("/_emulator/state") is not None, "emulator")

    @contextlib.contextmanager
    def own_emulator(self, cpu, name):
        """A fresh emulator process (on `cpu`) for the block; the proxies started inside it use
        it, the verification reads it; the run's emulator is back afterwards."""
        saved = (self.emulator, self.emu_port)
        self.emu_port = free_port()
        self.start_emulator(cpu, name)
        try:
            yield self.emulator
        finally:
            self.emulator.stop()
            self.emulator, self.emu_port = saved

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
             same_id=False, requests=None):
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
        if requests is not None:
            cmd += ["--requests", requests]
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
              ("outbox depth (sustained and WAN phases)", 470, 130)]
    colors = {"floor": "#888", "nginx": "#2a9d8f", "durable-floor": "#5e548e", "proxy-interval": "#e76f51",
              "proxy-always": "#9b2226", "proxy-interval-b100": "#f4a261", "e2e": "#264653",
              "e2e-half-rate": "#8ab17d", "e2e-hot": "#6a4c93", "e2e-hot-coalesced": "#c77dff",
              "memory-sweep": "#bbb", "warm": "#ddd"}
    palette = ["#1d3557", "#e63946", "#457b9d", "#ffb703", "#06d6a0", "#8338ec", "#fb8500", "#3a86ff"]
    for s in slots:
        if s["label"] not in colors:
            colors[s["label"]] = palette[(len(colors) - 12) % len(palette)]
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


# ---------------------------------------------------------------------------------------------
# W: WAN (the forwarder against a distant Credyt)

FORWARDER_CONCURRENCY_GAUGE = "credyt_proxy_forwarder_concurrency_limit"
OLD_DEFAULT_CONCURRENCY = 64  # outbox.forwarder_concurrency's default before issue 26


def proc_cpu_s(pid):
    """utime + stime of a process (all its threads), in seconds, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the command: state(0) ppid(1) ... utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid):
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d.name))
    return out


def metric_values(m, name):
    """{labels-or-'': value} of every sample of one metric in a parsed /metrics dict."""
    return {k[len(name):]: v for k, v in m.items() if k == name or k.startswith(name + "{")}


def emulator_faults(world, rules):
    http("PUT", f"http://127.0.0.1:{world.emu_port}/_emulator/faults", body={"rules": rules},
         headers={"X-CREDYT-API-KEY": PLATFORM_KEY})


def emulator_clear_faults(world):
    http("DELETE", f"http://127.0.0.1:{world.emu_port}/_emulator/faults",
         headers={"X-CREDYT-API-KEY": PLATFORM_KEY})


def close_stage(world, report, name):
    """Verifies everything acknowledged since the last stage (every proxy of it drained), then
    gives the next stage a fresh emulator (reset: no data, no faults)."""
    v = verify(world)
    report.setdefault("verification_stages", {})[name] = v
    log(f"  verification {name}: {json.dumps({k: x for k, x in v.items() if k != 'mismatches'})}")
    http("POST", f"http://127.0.0.1:{world.emu_port}/_emulator/reset",
         headers={"X-CREDYT-API-KEY": PLATFORM_KEY}, timeout=120)
    world.acked, world.unknown = {}, {}
    return v


def slope_per_s(points):
    """Least-squares slope of (t, y) points."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else None


class WanSampler(threading.Thread):
    """Every 0.5 s: outbox depth, fees accepted (so delivered = fees - depth, up to a constant),
    the forwarder's concurrency gauge when the build exports it, and the proxy's CPU time."""

    def __init__(self, proxy, t0):
        super().__init__(daemon=True)
        self.proxy, self.t0, self.samples, self.stop_flag = proxy, t0, [], threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                m = metrics(self.proxy)
                gauge = metric_values(m, FORWARDER_CONCURRENCY_GAUGE)
                self.samples.append({
                    "t": round(time.time() - self.t0, 2),
                    "depth": int(m.get("credyt_proxy_outbox_depth", -1)),
                    "fees": int(m.get("credyt_proxy_fees_total", 0)),
                    "concurrency_limit": sum(gauge.values()) if gauge else None,
                    "cpu_s": proc_cpu_s(self.proxy.pid)})
            except (OSError, urllib.error.URLError, ValueError):
                pass
            self.stop_flag.wait(0.5)

    def stop(self):
        self.stop_flag.set()
        self.join(5)
        return self.samples


def wan_settings(args):
    """[(label, {outbox key: value})]: one set of scenarios per forwarder setting. Only what
    was asked for is written to the proxy's config, so the kit runs against builds with and
    without the adaptive forwarder's keys."""
    common = {}
    if args.wan_concurrency_min is not None:
        common["forwarder_concurrency_min"] = args.wan_concurrency_min
    if args.wan_concurrency_max is not None:
        common["forwarder_concurrency_max"] = args.wan_concurrency_max
    for kv in args.wan_outbox:
        k, _, v = kv.partition("=")
        common[k.strip()] = v.strip()
    fixed = [int(c) for c in args.wan_concurrency.split(",") if c.strip()]
    if not fixed:
        parts = [f"{k.replace('forwarder_concurrency_', '')}{v}" for k, v in common.items()
                 if k.startswith("forwarder_concurrency_")]
        return [("-".join(parts) or "default", common)]
    return [(f"c{c}", {**common, "forwarder_concurrency": c}) for c in fixed]


def outbox_toml(settings):
    return "\n".join(f"{k} = {v}" for k, v in settings.items())


def wan_scenarios(args):
    lat = args.wan_latency_ms
    ra = {"retry_after_secs": args.wan_retry_after, "retry_after_form": "seconds"}
    slow_mean = (1 - args.wan_slow_rate) * lat + args.wan_slow_rate * args.wan_slow_ms
    return {
        "0ms": {"rules": [], "mean_latency_ms": 0.0},
        "50ms": {"rules": [{"path_prefix": "/", "latency_ms": lat}], "mean_latency_ms": float(lat)},
        "slow": {"rules": [{"path_prefix": "/", "latency_ms": lat, "slow_rate": args.wan_slow_rate,
                            "slow_latency_ms": args.wan_slow_ms}],
                 "mean_latency_ms": slow_mean,
                 "mean_latency_note": f"configured mix: {1 - args.wan_slow_rate:g} x {lat} ms + "
                                      f"{args.wan_slow_rate:g} x {args.wan_slow_ms} ms"},
        "429": {"rules": [{"path_prefix": "/", "latency_ms": lat, "rate_429": args.wan_429_rate, **ra}],
                "mean_latency_ms": float(lat),
                "mean_latency_note": f"every answer (429s included) takes {lat} ms; "
                                     f"{args.wan_429_rate:g} of them are 429 Retry-After: "
                                     f"{args.wan_retry_after}"},
    }


def wan_scenario(world, runner, args, report, setting_label, settings, name, sc, depth_series):
    """One WAN scenario on a fresh emulator and proxy: warm the identities with no faults, turn the faults
    on, offer `--wan-rate` events/s open loop for `--wan-secs`, count what reached Credyt, then
    clear the faults, drain (bounded) and verify."""
    label = f"wan-{name}-{setting_label}"
    with world.own_emulator(wan_emulator_cpu(args), f"emulator-{label}"):
        try:
            p = world.proxy(label, "interval", forwarder=True, extra_outbox=outbox_toml(settings))
        except ProxyFailed as e:
            log(f"  {label}: NOT MEASURABLE: {e}")
            return {"not_measurable": str(e)}
        return wan_measure(world, runner, args, report, settings, sc, depth_series, label, p)


def wan_emulator_cpu(args):
    """Where the WAN phase's emulators run: by default beside the proxy, as in phase B. Beside
    loadgen (issue 26's layout) the emulator shares a core with loadgen's open-loop spinning
    (it yields until each slot) and, measured at 9,500 events/s, was the bottleneck."""
    if args.load_cpu is None:
        return None
    return {"load": args.load_cpu, "server": "server"}.get(args.wan_emulator_cpu, args.wan_emulator_cpu)


def wan_measure(world, runner, args, report, settings, sc, depth_series, label, p):
    runner.load(p.port, "warm", 32, sweep=True, phase="warm", record=False)
    runner.drain(p, args.drain_timeout)
    emulator_faults(world, sc["rules"])
    sampler = WanSampler(p, runner.t0)
    sampler.start()
    charges0, t0 = world.charge_count(), time.time()
    emu_cpu0 = proc_cpu_s(world.emulator.pid)
    r = runner.load(p.port, label, args.wan_conns, duration=args.wan_secs, rate=args.wan_rate,
                    phase="wan")
    charges1, t1 = world.charge_count(), time.time()
    emu_cpu1 = proc_cpu_s(world.emulator.pid)
    samples = sampler.stop()
    depth_series += [{"t": x["t"], "depth": x["depth"]} for x in samples]
    # the faults end with the window: the backlog then drains at full speed (a 5 s tail or
    # 429s would make the drain of a large backlog take hours); retries under the faults
    # happened during the window, and the verification covers every event of it
    emulator_clear_faults(world)
    backlog = depth(p)
    drain_s, _ = runner.drain(p, args.drain_timeout)
    p.stop()
    window = t1 - t0
    start_s, end_s = t0 - runner.t0, t1 - runner.t0
    inside = [s for s in samples if start_s <= s["t"] <= end_s]
    half = [s for s in inside if s["t"] >= (start_s + end_s) / 2]
    steady = None
    if len(half) >= 2:
        a, b = half[0], half[-1]
        if b["t"] > a["t"]:
            steady = ((b["fees"] - b["depth"]) - (a["fees"] - a["depth"])) / (b["t"] - a["t"])
    depth_slope = slope_per_s([(s["t"], s["depth"]) for s in half])
    gauge = [s["concurrency_limit"] for s in half if s["concurrency_limit"] is not None]
    if gauge:
        conc, conc_src = statistics.mean(gauge), f"{FORWARDER_CONCURRENCY_GAUGE} (mean over the window's second half)"
    elif "forwarder_concurrency" in settings:
        conc, conc_src = int(settings["forwarder_concurrency"]), "configured outbox.forwarder_concurrency"
    elif "forwarder_concurrency_max" in settings:
        conc, conc_src = int(settings["forwarder_concurrency_max"]), "configured outbox.forwarder_concurrency_max (no gauge)"
    else:
        conc, conc_src = OLD_DEFAULT_CONCURRENCY, "build default assumed (64; no gauge, nothing configured)"
    delivered = (charges1 - charges0) / window
    res = {
        "faults": sc["rules"], "outbox_settings": settings,
        "offered_events_per_s": args.wan_rate, "window_s": round(window, 2),
        "acknowledged_events_per_s": round(r["events_per_s"], 1),
        "acknowledged_events": r["events_ok"],
        "latency_us": r["latency_us"], "loadgen_send_lag_us": r.get("send_lag_us"),
        "refused": {str(k): v for k, v in r["status"].items() if not str(k).startswith("2")},
        "errors": r["errors"],
        "delivered_charges": charges1 - charges0,
        "delivered_charges_per_s": round(delivered, 1),
        "delivered_charges_per_s_second_half": steady and round(steady, 1),
        "delivered_x_offered": ratio(delivered, args.wan_rate),
        "outbox_depth_end_of_window": backlog,
        "outbox_depth_max": max([s["depth"] for s in inside] + [0]),
        "outbox_depth_slope_per_s_second_half": depth_slope and round(depth_slope, 1),
        # bounded: the second half's depth does not grow by more than 2% of the offered rate
        "outbox_bounded": depth_slope is not None and depth_slope <= 0.02 * args.wan_rate,
        "outbox_depth_series": [{"t": round(s["t"] - start_s, 1), "depth": s["depth"]} for s in inside],
        "drain_after_window_s": drain_s and round(drain_s, 1), "drained": drain_s is not None,
        "proxy_cpu_s_in_window": round(inside[-1]["cpu_s"] - inside[0]["cpu_s"], 2) if len(inside) > 1 else None,
        "emulator_cpu_s_in_window": round(emu_cpu1 - emu_cpu0, 2),
        # the host's 1-minute load average after the window: other work on a shared machine
        "host_loadavg_1m": round(os.getloadavg()[0], 2),
        "concurrency_in_use": conc, "concurrency_source": conc_src,
        "concurrency_gauge_series": [s["concurrency_limit"] for s in inside] if gauge else None,
    }
    if sc["mean_latency_ms"] > 0:
        bound = conc / (sc["mean_latency_ms"] / 1000)
        res.update({"mean_upstream_latency_ms": round(sc["mean_latency_ms"], 2),
                    "mean_upstream_latency_source": sc.get("mean_latency_note", "configured latency_ms"),
                    "littles_law_bound_per_s": round(bound, 1),
                    "delivered_x_bound": ratio(delivered, bound),
                    "delivered_second_half_x_bound": steady and ratio(steady, bound)})
    log(f"  {label}: delivered {res['delivered_charges_per_s']}/s (2nd half "
        f"{res['delivered_charges_per_s_second_half']}/s) of {args.wan_rate}/s offered, "
        f"depth end {backlog} slope {res['outbox_depth_slope_per_s_second_half']}/s, "
        f"p99 {r['latency_us']['p99'] / 1000:.1f} ms, bound {res.get('littles_law_bound_per_s')}, "
        f"x_bound {res.get('delivered_x_bound')}, drain {res['drain_after_window_s']} s")
    res["verification"] = {k: v for k, v in close_stage(world, report, label).items() if k != "mismatches"}
    if res["verification"]["exact_match"] and not args.keep_outboxes:
        # drained and verified: free the disk now (a WAN run makes several large outboxes)
        shutil.rmtree(p.outbox, ignore_errors=True)
    return res


def start_nginx_hop(world, out, name="nginx"):
    """The floor and one nginx worker in front of it (loadtest/nginx.conf.template)."""
    fport = free_port()
    floor = Proc(f"floor-{name}", [FLOOR, f"127.0.0.1:{fport}", "1"], world.srv, out)
    wait_until(tcp_ready(fport), "floor")
    nport = free_port()
    ndir = out / name
    ndir.mkdir(exist_ok=True)
    conf = (ROOT / "loadtest" / "nginx.conf.template").read_text()
    conf = conf.replace("{{dir}}", str(ndir)).replace("{{port}}", str(nport)) \
               .replace("{{floor_port}}", str(fport))
    (ndir / "nginx.conf").write_text(conf)
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx = Proc(name, [nginx_bin, "-c", ndir / "nginx.conf", "-p", ndir], world.srv, out)
    wait_until(tcp_ready(nport), "nginx")
    return floor, fport, nginx, nport


def wan_cpu(world, runner, args, out, report, settings):
    """CPU per event of ingest + forward (the proxy process's utime + stime over a fixed number
    of events, until its outbox is empty; 0 ms upstream) against the nginx hop's CPU per
    request (the nginx worker's, over as many requests to the floor), in the same run. Each is
    measured with the other paused (SIGSTOP)."""
    with world.own_emulator(wan_emulator_cpu(args), "emulator-wan-cpu"):
        res = wan_cpu_measure(world, runner, args, out, settings)
        close_stage(world, report, "wan-cpu")
    return res


def wan_cpu_measure(world, runner, args, out, settings):
    n, conns = args.wan_cpu_events, args.wan_cpu_conns
    floor, _, nginx, nport = start_nginx_hop(world, out, "nginx-wan")
    wait_until(lambda: child_pids(nginx.pid), "nginx worker")
    workers = child_pids(nginx.pid)
    p = world.proxy("wan-cpu", "interval", forwarder=True, extra_outbox=outbox_toml(settings))
    try:
        runner.load(p.port, "warm", 32, sweep=True, phase="warm", record=False)
        runner.drain(p, args.drain_timeout)
        servers = [floor, nginx, p, world.emulator]
        with running_alone(servers, {floor, nginx}):
            w0 = sum(proc_cpu_s(w) for w in workers)
            f0 = proc_cpu_s(floor.pid)
            rn = runner.load(nport, "wan-cpu-nginx", conns, duration=3600, requests=n, proxy=False,
                             phase="wan-cpu")
            w1 = sum(proc_cpu_s(w) for w in workers)
            f1 = proc_cpu_s(floor.pid)
        with running_alone(servers, {p, world.emulator}):
            c0, e0, t0 = proc_cpu_s(p.pid), proc_cpu_s(world.emulator.pid), time.time()
            rp = runner.load(p.port, "wan-cpu-proxy", conns, duration=3600, requests=n,
                             phase="wan-cpu")
            t_ingested, backlog = time.time(), depth(p)
            secs, _ = runner.drain(p, args.drain_timeout)
            c1, e1, t1 = proc_cpu_s(p.pid), proc_cpu_s(world.emulator.pid), time.time()
    finally:
        p.stop()
        nginx.stop()
        floor.stop()
    nginx_per = (w1 - w0) / rn["ok"] if rn["ok"] else None
    proxy_per = (c1 - c0) / rp["events_ok"] if rp["events_ok"] else None
    res = {
        "events": n, "connections": conns, "outbox_settings": settings,
        "proxy": {"acknowledged_events": rp["events_ok"], "cpu_s": round(c1 - c0, 2),
                  "cpu_us_per_event": proxy_per and round(proxy_per * 1e6, 2),
                  "ingest_events_per_s": round(rp["events_per_s"], 1),
                  "outbox_depth_after_ingest": backlog,
                  "drained": secs is not None, "wall_s": round(t1 - t0, 2),
                  "drain_after_ingest_s": secs and round(secs, 2),
                  "drain_charges_per_s": round(backlog / secs, 1) if secs and backlog else None,
                  "emulator_cpu_s": round(e1 - e0, 2)},
        "nginx_hop": {"requests_ok": rn["ok"], "worker_cpu_s": round(w1 - w0, 2),
                      "cpu_us_per_request": nginx_per and round(nginx_per * 1e6, 2),
                      "requests_per_s": round(rn["requests_per_s"], 1),
                      "floor_cpu_s": round(f1 - f0, 2), "nginx_workers": len(workers)},
        "proxy_x_nginx_cpu": ratio(proxy_per, nginx_per) if proxy_per and nginx_per else None,
        "host_loadavg_1m": round(os.getloadavg()[0], 2),
        "method": "CPU time = utime + stime from /proc/PID/stat (10 ms ticks); the proxy's over "
                  "its whole process from the first event until its outbox is empty (emulator "
                  "at 0 ms, not counted); nginx: its worker process only (not the floor behind "
                  "it); closed loop, same connections and request count; the other servers "
                  "paused",
    }
    log(f"  cpu: proxy {res['proxy']['cpu_us_per_event']} us/event, nginx hop "
        f"{res['nginx_hop']['cpu_us_per_request']} us/request, ratio {res['proxy_x_nginx_cpu']}")
    return res


def wan_phase(world, runner, args, out, report, depth_series):
    wanted = set(filter(None, args.wan_scenarios.split(",")))
    scenarios = wan_scenarios(args)
    wan = report.setdefault("wan", {
        "method": {
            "layout": f"proxy on the server core ({args.server_cpu}); a fresh emulator per "
                      f"scenario on cpu {args.server_cpu if wan_emulator_cpu(args) == 'server' else wan_emulator_cpu(args)} "
                      f"(--wan-emulator-cpu {args.wan_emulator_cpu}); loadgen on the load core ({args.load_cpu})",
            "proxy": "sync=interval, forwarder on, one 0.50 USD charge per event; a fresh proxy per scenario",
            "emulator": "a fresh process per scenario; faults on every path after the "
                        "identity warm-up, cleared when the window ends",
            "offered_load": f"open loop, {args.wan_rate} events/s for {args.wan_secs} s, "
                            f"{args.wan_conns} connections, {args.users} end users x {args.tenants} tenants",
            "delivered": "charges the emulator counted during the window / window length; "
                         "second half: fees accepted - outbox depth from the proxy's metrics",
            "littles_law_bound": "concurrency in use / mean upstream latency; concurrency from "
                                 f"{FORWARDER_CONCURRENCY_GAUGE} when exported, else the configured "
                                 "value; mean latency from the configured fault mix, not measured",
        },
        "settings": {}, "scenarios": {}})
    settings_list = wan_settings(args)
    for setting_label, settings in settings_list:
        wan["settings"][setting_label] = settings
        for name in ("0ms", "50ms", "slow", "429"):
            if name not in wanted:
                continue
            log(f"phase W: {name} with outbox settings {settings or '(build defaults)'}")
            wan["scenarios"][f"{name}-{setting_label}"] = wan_scenario(
                world, runner, args, report, setting_label, settings, name, scenarios[name],
                depth_series)
    if "cpu" in wanted:
        log(f"phase W: CPU per event ({args.wan_cpu_events} events) against the nginx hop")
        wan["cpu"] = wan_cpu(world, runner, args, out, report, settings_list[0][1])


def wan_table(wan):
    rows = ["| scenario | offered/s | delivered/s (window) | 2nd half/s | outbox | p99 ms | "
            "conc | bound/s | x bound | drain s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in wan.get("scenarios", {}).items():
        if "not_measurable" in r:
            rows.append(f"| {name} | not measurable: {r['not_measurable'][:80]} |||||||||")
            continue
        bounded = "bounded" if r["outbox_bounded"] else f"growing {r['outbox_depth_slope_per_s_second_half']}/s"
        rows.append(f"| {name} | {r['offered_events_per_s']:g} | {r['delivered_charges_per_s']:g} | "
                    f"{r['delivered_charges_per_s_second_half']} | {bounded} (end {r['outbox_depth_end_of_window']}) | "
                    f"{r['latency_us']['p99'] / 1000:.1f} | {r['concurrency_in_use']:g} | "
                    f"{r.get('littles_law_bound_per_s', '-')} | {r.get('delivered_x_bound', '-')} | "
                    f"{r['drain_after_window_s']} |")
    return "\n".join(rows)


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
    ap.add_argument("--skip", default="", help="comma list of phases to skip: capacity,wan,sustained,coalesce,memory")
    ap.add_argument("--bin-dir", type=Path, default=None,
                    help="folder of credyt-proxy, examples/floor, examples/loadgen (default "
                         "$CARGO_TARGET_DIR/release or target/release)")
    w = ap.add_argument_group("W: WAN phase (upstream latency and faults)")
    w.add_argument("--wan-only", action="store_true",
                   help="run only the WAN phase (and the verification): --skip capacity,sustained,coalesce,memory")
    w.add_argument("--wan-scenarios", default="0ms,50ms,slow,429,cpu",
                   help="comma list of WAN scenarios: 0ms,50ms,slow,429,cpu")
    w.add_argument("--wan-rate", type=float, default=9500.0, help="offered events/s (open loop)")
    w.add_argument("--wan-secs", type=float, default=20.0, help="seconds of offered load per scenario")
    w.add_argument("--wan-conns", type=int, default=64, help="loadgen connections of the WAN scenarios")
    w.add_argument("--wan-latency-ms", type=int, default=50)
    w.add_argument("--wan-slow-rate", type=float, default=0.02, help="share of calls in the slow tail")
    w.add_argument("--wan-slow-ms", type=int, default=5000, help="latency of the slow tail")
    w.add_argument("--wan-429-rate", type=float, default=0.2, help="share of calls answered 429")
    w.add_argument("--wan-retry-after", type=int, default=1, help="Retry-After seconds of those 429s")
    w.add_argument("--wan-concurrency", default="",
                   help="comma list of fixed outbox.forwarder_concurrency values, one set of "
                        "scenarios each (e.g. 64,1024); empty: not set (the build's default)")
    w.add_argument("--wan-concurrency-min", type=int, default=None,
                   help="outbox.forwarder_concurrency_min (adaptive forwarder builds only)")
    w.add_argument("--wan-concurrency-max", type=int, default=None,
                   help="outbox.forwarder_concurrency_max (adaptive forwarder builds only)")
    w.add_argument("--wan-outbox", action="append", default=[], metavar="KEY=VALUE",
                   help="any other [outbox] setting for the WAN proxies, as TOML (repeatable)")
    w.add_argument("--wan-cpu-events", type=int, default=200_000,
                   help="events of the CPU-per-event measurement (and requests through nginx)")
    w.add_argument("--wan-cpu-conns", type=int, default=32)
    w.add_argument("--wan-emulator-cpu", default="server",
                   help="cpu of the WAN phase's emulators: server (beside the proxy, as in phase "
                        "B; default), load (beside loadgen, the layout of issue 26's table; an "
                        "open-loop loadgen spins on its core, so there the emulator gets about "
                        "half of it and becomes the bottleneck near 9,500/s), or a cpu number")
    args = ap.parse_args()
    if args.bin_dir:
        set_bin_dir(args.bin_dir)
    if args.quick:
        args.slot, args.rounds, args.sustain, args.mem_users, args.conns = 2.0, 1, 5.0, 2000, "32"
    if (os.cpu_count() or 1) < 2:
        log("fewer than 2 cores: not pinning")
        args.load_cpu = args.server_cpu = None
    skip = set(filter(None, args.skip.split(",")))
    if args.wan_only:
        skip |= {"capacity", "sustained", "coalesce", "memory"}
        args.mem_users = 0
    for b in (BIN, FLOOR, LOADGEN):
        if not b.exists():
            sys.exit(f"{b} is missing: run loadtest/run.sh (it builds the release binaries)")
    # absolute: the proxies' configs and nginx's are read from other working folders
    out = (args.out or ROOT / "target" / "loadtest" / time.strftime("%Y%m%dT%H%M%S")).resolve()
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

        # ---- W: WAN ------------------------------------------------------------------------
        if "wan" not in skip:
            if world.acked:
                close_stage(world, report, "before-wan")
            wan_phase(world, runner, args, out, report, depth_series)

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
    if "wan" in report:
        print(f"\nWAN ({json.dumps(report['wan']['method'])}):")
        print(wan_table(report["wan"]))
        if "cpu" in report["wan"]:
            print(f"\nWAN CPU per event: {json.dumps(report['wan']['cpu'])}")
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
