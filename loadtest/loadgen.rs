//! loadgen: the load-test kit's HTTP/1.1 load generator (one thread, keep-alive connections).
//!
//! Why not wrk alone: wrk gives totals, and its Lua `response()` cannot tell which request a
//! response belongs to, so it can count acknowledgements but not *which customer's* events
//! were acknowledged, nor give latency per second. loadgen keeps, per connection, the request
//! it is waiting for, so it knows exactly which events were acknowledged for which customer
//! (the kit's loss check compares that, exactly, with what the Credyt emulator charged), and it
//! records every latency into a histogram per second of the run.
//!
//! Runs on a tokio current-thread runtime (pin it with `taskset`); every connection is a task
//! with one request in flight. At the end no new request is started, and the ones in flight are
//! awaited (bounded), so every event ends up acknowledged, refused, or explicitly `unknown`
//! (timeout or broken connection).
//!
//! Modes: closed loop (default; each connection sends its next request when the previous one
//! was answered), open loop (`--rate R`: requests are scheduled at R/s in total and latency is
//! measured from the scheduled time, so a stalled server is not hidden: no coordinated
//! omission), and `--sweep` (one request for every (tenant, user) pair, then stop: warms the
//! identity cache). `--requests N` stops after N requests in the closed or open loop (a fixed
//! amount of work, to divide a server's CPU time by).
//!
//! Output: one JSON object on stdout (see `Report`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const USAGE: &str =
    "loadgen --addr 127.0.0.1:8080 --keys FILE [--path /events] [--connections 32] \
[--duration 5] [--rate R] [--batch 1] [--users 1000] [--event-type video_promoted] \
[--run-id ID] [--sweep] [--same-id] [--hot-users N --hot-share 0.9] [--timeout 10] \
[--requests N]";

struct Args {
    addr: SocketAddr,
    path: String,
    keys: Vec<String>,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
    batch: usize,
    users: usize,
    event_type: String,
    run_id: String,
    sweep: bool,
    /// Every request carries the same event id (after the first, duplicates): exercises
    /// authentication and identity without adding per-event state to the server.
    same_id: bool,
    hot_users: usize,
    hot_share: f64,
    timeout: Duration,
    /// Start at most this many requests in all, then stop (with `--duration` as the bound):
    /// a fixed amount of work, e.g. to divide a server's CPU time by.
    requests: Option<u64>,
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:8080".parse().unwrap(),
        path: "/events".into(),
        keys: Vec::new(),
        connections: 32,
        duration: Duration::from_secs(5),
        rate: None,
        batch: 1,
        users: 1000,
        event_type: "video_promoted".into(),
        run_id: format!("r{}", std::process::id()),
        sweep: false,
        same_id: false,
        hot_users: 0,
        hot_share: 0.0,
        timeout: Duration::from_secs(10),
        requests: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| panic!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--addr" => a.addr = val().parse().expect("--addr"),
            "--path" => a.path = val(),
            "--keys" => {
                let text = std::fs::read_to_string(val()).expect("--keys file");
                a.keys = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
            }
            "--key" => a.keys.push(val()),
            "--connections" => a.connections = val().parse().expect("--connections"),
            "--duration" => a.duration = Duration::from_secs_f64(val().parse().expect("secs")),
            "--rate" => a.rate = Some(val().parse().expect("--rate")),
            "--batch" => a.batch = val().parse().expect("--batch"),
            "--users" => a.users = val().parse().expect("--users"),
            "--event-type" => a.event_type = val(),
            "--run-id" => a.run_id = val(),
            "--sweep" => a.sweep = true,
            "--same-id" => a.same_id = true,
            "--hot-users" => a.hot_users = val().parse().expect("--hot-users"),
            "--hot-share" => a.hot_share = val().parse().expect("--hot-share"),
            "--timeout" => a.timeout = Duration::from_secs_f64(val().parse().expect("secs")),
            "--requests" => a.requests = Some(val().parse().expect("--requests")),
            _ => panic!("unknown flag {flag}\n{USAGE}"),
        }
    }
    if a.keys.is_empty() {
        a.keys.push("none".into());
    }
    assert!(a.connections > 0 && a.batch > 0 && a.users > 0, "{USAGE}");
    a
}

/// Log-linear latency histogram in microseconds (about 1.6% resolution).
#[derive(Clone)]
struct Hist {
    buckets: Vec<u64>,
    count: u64,
    sum: u64,
    max: u64,
}

const SUB: u32 = 6;

impl Default for Hist {
    fn default() -> Hist {
        Hist::new()
    }
}

impl Hist {
    fn new() -> Hist {
        Hist {
            buckets: vec![0; 128 + 58 * 64],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
    fn index(us: u64) -> usize {
        if us < 128 {
            return us as usize;
        }
        let bit = 63 - us.leading_zeros();
        let shift = bit - SUB;
        let mantissa = (us >> shift) & 63;
        128 + ((bit - 7) as usize) * 64 + mantissa as usize
    }
    fn upper(index: usize) -> u64 {
        if index < 128 {
            return index as u64;
        }
        let bit = (index - 128) / 64 + 7;
        let mantissa = ((index - 128) % 64) as u64;
        let shift = bit as u32 - SUB;
        ((64 + mantissa + 1) << shift) - 1
    }
    fn record(&mut self, us: u64) {
        self.buckets[Self::index(us)] += 1;
        self.count += 1;
        self.sum += us;
        self.max = self.max.max(us);
    }
    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.max = self.max.max(o.max);
    }
    /// The value at quantile `q` (upper edge of its bucket, capped at the true max).
    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
    fn summary(&self) -> Latency {
        Latency {
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            max: self.max,
            mean: self.sum.checked_div(self.count).unwrap_or(0),
        }
    }
}

#[derive(Serialize, Clone, Copy)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: u64,
}

struct Second {
    requests: u64,
    ok: u64,
    events_ok: u64,
    hist: Hist,
}

#[derive(Default)]
struct Shared {
    seconds: Vec<Second>,
    status: BTreeMap<u16, u64>,
    codes: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
    /// (tenant index, user index) -> events acknowledged.
    acked: HashMap<(u32, u32), u64>,
    /// (tenant index, user index) -> events whose outcome is unknown (timeout, broken socket).
    unknown: HashMap<(u32, u32), u64>,
    sent: u64,
    last_done: Option<Instant>,
    /// Open loop: how late requests left against slots that came while their connection was
    /// idle (the tool's own scheduling error).
    send_lag: Hist,
}

impl Shared {
    fn second(&mut self, s: usize) -> &mut Second {
        while self.seconds.len() <= s {
            self.seconds.push(Second {
                requests: 0,
                ok: 0,
                events_ok: 0,
                hist: Hist::new(),
            });
        }
        &mut self.seconds[s]
    }
}

#[derive(Serialize)]
struct SecondOut {
    t: usize,
    requests: u64,
    ok: u64,
    events_ok: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

/// What loadgen prints.
#[derive(Serialize)]
struct Report {
    addr: String,
    path: String,
    mode: &'static str,
    connections: usize,
    batch: usize,
    target_rate: Option<f64>,
    /// From the first request to the last answer.
    elapsed_s: f64,
    sent: u64,
    requests: u64,
    ok: u64,
    events_ok: u64,
    requests_per_s: f64,
    ok_per_s: f64,
    events_per_s: f64,
    latency_us: Latency,
    /// Open loop: how late requests left against slots that came while their connection was
    /// idle: loadgen's own scheduling error, included in `latency_us` (a run where it is large
    /// measured the machine, not the server); `null` in the other modes.
    send_lag_us: Option<Latency>,
    status: BTreeMap<u16, u64>,
    codes: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
    per_second: Vec<SecondOut>,
    /// "tenant_index/user_index" -> acknowledged events.
    acked: BTreeMap<String, u64>,
    unknown: BTreeMap<String, u64>,
}

/// Picks users: uniform, or `hot_share` of the requests on the first `hot_users` users.
struct Picker {
    state: u64,
    tenants: u32,
    users: u32,
    hot_users: u32,
    hot_share: f64,
}

impl Picker {
    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick(&mut self) -> (u32, u32) {
        let tenant = (self.next_u64() % u64::from(self.tenants)) as u32;
        let hot = self.hot_users > 0
            && (self.next_u64() % 1_000_000) as f64 / 1_000_000.0 < self.hot_share;
        let span = if hot { self.hot_users } else { self.users };
        let user = (self.next_u64() % u64::from(span)) as u32;
        (tenant, user)
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP/1.1 response (Content-Length bodies only; chunked is refused).
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Response> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])
                .map_err(|_| std::io::Error::other("non-utf8 head"))?;
            let status: u16 = head
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| std::io::Error::other("bad status line"))?;
            let mut length = 0usize;
            let mut close = false;
            for line in head.split("\r\n").skip(1) {
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value
                        .parse()
                        .map_err(|_| std::io::Error::other("bad content-length"))?;
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(std::io::Error::other("chunked responses are not supported"));
                } else if name.eq_ignore_ascii_case("connection")
                    && value.eq_ignore_ascii_case("close")
                {
                    close = true;
                }
            }
            let total = end + 4 + length;
            while buf.len() < total {
                if stream.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            let body = buf[end + 4..total].to_vec();
            buf.drain(..total);
            return Ok(Response {
                status,
                body,
                close,
            });
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn error_code(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.find("\"code\":\"")
        .map(|i| {
            let rest = &text[i + 8..];
            rest[..rest.find('"').unwrap_or(rest.len())].to_string()
        })
        .unwrap_or_else(|| "-".into())
}

struct Conn {
    id: usize,
    args: Rc<Args>,
    shared: Rc<RefCell<Shared>>,
    start: Instant,
    deadline: Instant,
    occurred_at: String,
    sweep_next: Rc<RefCell<u64>>,
}

impl Conn {
    fn request(&self, seq: u64, tenant: u32, user: u32) -> Vec<u8> {
        let a = &self.args;
        let mut events = String::with_capacity(a.batch * 110);
        for j in 0..a.batch {
            if j > 0 {
                events.push(',');
            }
            let id = if a.same_id {
                format!("{}-same-{j}", a.run_id)
            } else {
                format!("{}-{}-{}-{}", a.run_id, self.id, seq, j)
            };
            events.push_str(&format!(
                r#"{{"id":"{id}","event_type":"{}","occurred_at":"{}"}}"#,
                a.event_type, self.occurred_at
            ));
        }
        let body = format!(r#"{{"customer_external_id":"u{user}","events":[{events}]}}"#);
        let mut req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nX-CREDYT-API-KEY: {}\r\nContent-Length: {}\r\n\r\n",
            a.path,
            a.addr,
            a.keys[tenant as usize],
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body.as_bytes());
        req
    }

    async fn run(self, mut stream: Option<TcpStream>) {
        let a = self.args.clone();
        let mut picker = Picker {
            state: 0x9E37_79B9_7F4A_7C15 ^ ((self.id as u64 + 1) * 0x1000_0001),
            tenants: a.keys.len() as u32,
            users: a.users as u32,
            hot_users: a.hot_users.min(a.users) as u32,
            hot_share: a.hot_share,
        };
        let interval = a
            .rate
            .map(|r| Duration::from_secs_f64(a.connections as f64 / r));
        let phase = interval.map(|i| i.mul_f64(self.id as f64 / a.connections as f64));
        let mut buf = Vec::with_capacity(4096);
        let mut seq: u64 = 0;
        loop {
            let now = Instant::now();
            let (tenant, user) = if a.sweep {
                let n = {
                    let mut next = self.sweep_next.borrow_mut();
                    let n = *next;
                    *next += 1;
                    n
                };
                let total = (a.keys.len() * a.users) as u64;
                if n >= total {
                    break;
                }
                (
                    (n % a.keys.len() as u64) as u32,
                    (n / a.keys.len() as u64) as u32,
                )
            } else {
                if now >= self.deadline {
                    break;
                }
                if let Some(limit) = a.requests {
                    // The sweep's counter, unused outside sweeps: requests started so far.
                    let mut started = self.sweep_next.borrow_mut();
                    if *started >= limit {
                        break;
                    }
                    *started += 1;
                }
                picker.pick()
            };
            // Open loop: wait for this request's slot; latency counts from the slot.
            let intended = match (interval, phase) {
                (Some(i), Some(p)) => {
                    let slot = self.start + p + i.mul_f64(seq as f64);
                    if slot >= self.deadline {
                        break;
                    }
                    // A slot that passed while this connection still waited for its previous
                    // answer is the server's delay (it counts in the latency, as it should);
                    // one that passed while the connection was idle is loadgen's own.
                    let idle_at_slot = slot > now;
                    wait_until(slot).await;
                    if idle_at_slot {
                        let lag = Instant::now().saturating_duration_since(slot);
                        self.shared
                            .borrow_mut()
                            .send_lag
                            .record(lag.as_micros() as u64);
                    }
                    slot
                }
                _ => now,
            };
            let req = self.request(seq, tenant, user);
            seq += 1;
            if stream.is_none() {
                match TcpStream::connect(self.args.addr).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        stream = Some(s);
                        buf.clear();
                    }
                    Err(_) => {
                        *self
                            .shared
                            .borrow_mut()
                            .errors
                            .entry("connect")
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let s = stream.as_mut().unwrap();
            self.shared.borrow_mut().sent += 1;
            let exchange = async {
                s.write_all(&req).await?;
                read_response(s, &mut buf).await
            };
            let result = tokio::time::timeout(a.timeout, exchange).await;
            let done = Instant::now();
            let mut sh = self.shared.borrow_mut();
            sh.last_done = Some(done);
            let key = (tenant, user);
            match result {
                Ok(Ok(resp)) => {
                    let us = done.duration_since(intended).as_micros() as u64;
                    let ok = (200..300).contains(&resp.status);
                    *sh.status.entry(resp.status).or_default() += 1;
                    if ok {
                        *sh.acked.entry(key).or_default() += a.batch as u64;
                    } else {
                        *sh.codes.entry(error_code(&resp.body)).or_default() += 1;
                    }
                    let second = sh.second(done.duration_since(self.start).as_secs() as usize);
                    second.requests += 1;
                    second.hist.record(us);
                    if ok {
                        second.ok += 1;
                        second.events_ok += a.batch as u64;
                    }
                    if resp.close {
                        stream = None;
                    }
                }
                Ok(Err(_)) => {
                    *sh.errors.entry("io").or_default() += 1;
                    *sh.unknown.entry(key).or_default() += a.batch as u64;
                    stream = None;
                }
                Err(_) => {
                    *sh.errors.entry("timeout").or_default() += 1;
                    *sh.unknown.entry(key).or_default() += a.batch as u64;
                    stream = None;
                }
            }
        }
    }
}

/// Waits until `slot` to within a few microseconds. Tokio's timer fires on millisecond ticks,
/// which alone would add up to a millisecond to every open-loop latency (measured from the
/// slot); so it sleeps to just before the slot and yields until it comes. loadgen has its core
/// to itself (pinned), so the spinning costs the servers nothing.
async fn wait_until(slot: Instant) {
    const TIMER_SLACK: Duration = Duration::from_millis(2);
    let now = Instant::now();
    if slot <= now {
        return;
    }
    if slot - now > TIMER_SLACK {
        tokio::time::sleep_until((slot - TIMER_SLACK).into()).await;
    }
    while Instant::now() < slot {
        tokio::task::yield_now().await;
    }
}

fn main() {
    let args = Rc::new(parse_args());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let shared = Rc::new(RefCell::new(Shared::default()));
    let occurred_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let sweep_next = Rc::new(RefCell::new(0u64));
    let start = local.block_on(&rt, async {
        // Connect first (a refused connect is retried by the connection's task), so the clock
        // and the open-loop schedule start with every connection ready.
        let mut streams = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            let s = TcpStream::connect(args.addr).await.ok();
            if let Some(s) = &s {
                let _ = s.set_nodelay(true);
            }
            streams.push(s);
        }
        let start = Instant::now();
        let deadline = start + args.duration;
        let mut tasks = Vec::new();
        for (id, stream) in streams.into_iter().enumerate() {
            let conn = Conn {
                id,
                args: args.clone(),
                shared: shared.clone(),
                start,
                deadline,
                occurred_at: occurred_at.clone(),
                sweep_next: sweep_next.clone(),
            };
            tasks.push(tokio::task::spawn_local(conn.run(stream)));
        }
        for t in tasks {
            let _ = t.await;
        }
        start
    });
    let sh = shared.borrow();
    let end = sh.last_done.unwrap_or(start);
    let elapsed = end.duration_since(start).as_secs_f64().max(1e-9);
    let mut all = Hist::new();
    let mut per_second = Vec::new();
    let (mut requests, mut ok, mut events_ok) = (0, 0, 0);
    for (t, s) in sh.seconds.iter().enumerate() {
        all.merge(&s.hist);
        requests += s.requests;
        ok += s.ok;
        events_ok += s.events_ok;
        let l = s.hist.summary();
        per_second.push(SecondOut {
            t,
            requests: s.requests,
            ok: s.ok,
            events_ok: s.events_ok,
            p50_us: l.p50,
            p99_us: l.p99,
            max_us: l.max,
        });
    }
    let label = |m: &HashMap<(u32, u32), u64>| {
        m.iter()
            .map(|((t, u), n)| (format!("{t}/{u}"), *n))
            .collect::<BTreeMap<_, _>>()
    };
    let report = Report {
        addr: args.addr.to_string(),
        path: args.path.clone(),
        mode: if args.sweep {
            "sweep"
        } else if args.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        connections: args.connections,
        batch: args.batch,
        target_rate: args.rate,
        elapsed_s: elapsed,
        sent: sh.sent,
        requests,
        ok,
        events_ok,
        requests_per_s: requests as f64 / elapsed,
        ok_per_s: ok as f64 / elapsed,
        events_per_s: events_ok as f64 / elapsed,
        latency_us: all.summary(),
        send_lag_us: args.rate.map(|_| sh.send_lag.summary()),
        status: sh.status.clone(),
        codes: sh.codes.clone(),
        errors: sh.errors.clone(),
        per_second,
        acked: label(&sh.acked),
        unknown: label(&sh.unknown),
    };
    println!("{}", serde_json::to_string(&report).expect("json"));
}

#[cfg(test)]
mod tests {
    use super::Hist;

    #[test]
    fn histogram_buckets_cover_their_values() {
        for us in [0u64, 1, 127, 128, 129, 1000, 4_999, 65_536, 10_000_000] {
            let i = Hist::index(us);
            assert!(Hist::upper(i) >= us, "{us}");
            assert!(Hist::upper(i) <= us + us / 60 + 1, "{us}");
        }
    }
}
