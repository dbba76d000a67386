//! A constant-rate HTTP/1.1 load generator for `benches/tail.py`'s fixed-rate rows, with less tail of
//! its own than oha: one thread, one `epoll` loop, a `timerfd` for the pacing, each request a single
//! `send` and its response usually a single `recv`. On a two-core machine the generator shares its core
//! with the upstream, so its own tail adds to the proxy's in every client-side figure: straight to
//! nginx at 16–38 k req/s this one's p99 is 0.37–0.46 ms against oha's 0.99–3.28 ms, for about the same
//! CPU per request; its 100 µs pacing ticks cost more of the core at low rates
//! (`benches/rate_vs_oha.py`, `benches/results/2026-12-04-rate-vs-oha.txt`).
//!
//! Request k is due at `start + k / rate` (open loop); it goes out on the first idle connection at the
//! first pacing tick (100 µs) at or after that time, or at once when a connection frees up later than
//! that (no pipelining: one request in flight per connection). Its latency is counted from when it was
//! due, not from when it was sent — a stall anywhere, the generator's included, shows in full (no
//! coordinated omission). Requests still unsent 2 s after the run's time is up are not sent, and lower
//! the delivered rate (requests done / SECONDS; the caller compares it with the asked one).
//!
//! ```text
//! cargo bench --bench rate --no-run
//! target/release/deps/rate-* URL RATE SECONDS CONNECTIONS [BODY]
//! ```
//!
//! `BODY` given: `POST` it as `application/json`; else `GET`. Prints one JSON object: the asked and the
//! delivered rate, requests done, non-2xx responses, transport errors, and the latency quantiles in ms.
//! Run by `cargo bench` with no URL, it says what it is and exits.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How long in-flight requests may finish after the run's time is up.
const GRACE: Duration = Duration::from_secs(2);
/// The timerfd's token in epoll (connections use their index).
const TIMER: u64 = u64::MAX;
/// The pacing timer fires on multiples of this after the start, sending every request due by then:
/// a wake-up (and a timer reprogramming, costly in a VM) per request would cost more than the
/// requests. A request waits at most this long for its tick, counted in its latency.
const TICK: Duration = Duration::from_micros(100);

struct Args {
    host: String,
    path: String,
    rate: f64,
    seconds: f64,
    connections: usize,
    body: Option<String>,
}

fn parse_args() -> Option<Args> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args.first().filter(|a| a.starts_with("http://"))?;
    let rest = &url["http://".len()..];
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let number = |i: usize| args.get(i)?.parse::<f64>().ok().filter(|x| *x > 0.0);
    Some(Args {
        host: host.to_string(),
        path: path.to_string(),
        rate: number(1)?,
        seconds: number(2)?,
        connections: args.get(3)?.parse::<usize>().ok().filter(|n| *n >= 1)?,
        body: args.get(4).cloned(),
    })
}

fn request_bytes(a: &Args) -> Vec<u8> {
    match &a.body {
        Some(body) => format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            a.path,
            a.host,
            body.len(),
            body
        ),
        None => format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", a.path, a.host),
    }
    .into_bytes()
}

/// Where a response read so far stands.
enum Progress {
    Incomplete,
    /// Complete, with its status; `close` when the server closes the connection after it.
    Done {
        status: u16,
        close: bool,
    },
    Invalid(String),
}

/// Parses the response at the start of `buf`: the head, then a `Content-Length` or chunked body.
fn progress(buf: &[u8]) -> Progress {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Progress::Incomplete,
        Err(e) => return Progress::Invalid(format!("bad response head: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
    let body = &buf[head..];
    if let Some(length) = header("content-length") {
        let Some(length) = std::str::from_utf8(length)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
        else {
            return Progress::Invalid("bad content-length".into());
        };
        return if body.len() >= length {
            Progress::Done { status, close }
        } else {
            Progress::Incomplete
        };
    }
    let chunked =
        header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().ends_with(b"chunked"));
    if !chunked {
        return Progress::Invalid(
            "a response without a length (the generator keeps connections)".into(),
        );
    }
    match chunked_end(body) {
        Ok(true) => Progress::Done { status, close },
        Ok(false) => Progress::Incomplete,
        Err(why) => Progress::Invalid(why),
    }
}

/// Whether the chunked body at the start of `body` (no trailers) is all there; an error for a chunk
/// size line that is not one.
fn chunked_end(body: &[u8]) -> Result<bool, String> {
    let mut at = 0;
    loop {
        let Some(line) = body[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(false);
        };
        let size = std::str::from_utf8(&body[at..at + line])
            .ok()
            .and_then(|text| usize::from_str_radix(text.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| "bad chunk size line".to_string())?;
        at += line + 2;
        if size == 0 {
            return Ok(body.len() >= at + 2);
        }
        at += size + 2;
        if body.len() < at {
            return Ok(false);
        }
    }
}

struct Conn {
    stream: TcpStream,
    /// When the request in flight was due; `None` when idle.
    due: Option<Instant>,
    /// Bytes of the request in flight still to write (a full send buffer; never seen in practice).
    unsent: usize,
    buf: Vec<u8>,
}

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain system call; the returned fd is checked and then owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: `event` lives across the call; the fds are open.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: `events` is a valid buffer of its length.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        match n {
            n if n >= 0 => Ok(n as usize),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => Ok(0),
                e => Err(e),
            },
        }
    }
}

/// A monotonic one-shot timer the epoll loop waits on, with nanosecond resolution (timer slack aside).
struct Timer(OwnedFd);

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: plain system call; the returned fd is checked and then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Timer(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once after `after` (at least 1 ns: zero would disarm it).
    fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` lives across the call; a null old value is allowed.
        if unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the expiry count, so that the level-triggered fd stops being readable.
    fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `count`; EAGAIN (not yet expired) is fine.
        unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }
}

struct Run {
    requests: u64,
    non2xx: u64,
    errors: u64,
    first_error: Option<String>,
    latency_us: Histogram<u64>,
    /// Requests due in the run's time but never sent (the connections stayed busy past the grace).
    unsent: u64,
}

fn connect(addr: &std::net::SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

fn run(a: &Args) -> io::Result<Run> {
    let addr = a
        .host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("no address"))?;
    let request = request_bytes(a);
    let epoll = Epoll::new()?;
    let timer = Timer::new()?;
    epoll.ctl(
        libc::EPOLL_CTL_ADD,
        timer.0.as_raw_fd(),
        libc::EPOLLIN as u32,
        TIMER,
    )?;
    let mut conns = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let stream = connect(&addr)?;
        epoll.ctl(
            libc::EPOLL_CTL_ADD,
            stream.as_raw_fd(),
            libc::EPOLLIN as u32,
            i as u64,
        )?;
        conns.push(Conn {
            stream,
            due: None,
            unsent: 0,
            buf: Vec::with_capacity(16 << 10),
        });
    }
    let mut idle: Vec<usize> = (0..a.connections).rev().collect();
    let mut out = Run {
        requests: 0,
        non2xx: 0,
        errors: 0,
        first_error: None,
        latency_us: Histogram::new_with_bounds(1, 120_000_000, 3).map_err(io::Error::other)?,
        unsent: 0,
    };
    let total = (a.rate * a.seconds) as u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.seconds) + GRACE;
    let mut next = 0u64;
    // When the timer is set to fire: set again only for another tick.
    let mut armed: Option<Instant> = None;
    let due = |k: u64| start + Duration::from_secs_f64(k as f64 / a.rate);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; a.connections + 1];
    let mut chunk = vec![0u8; 64 << 10];

    loop {
        let now = Instant::now();
        // Every due request on an idle connection.
        while next < total && due(next) <= now {
            let Some(i) = idle.pop() else { break };
            let c = &mut conns[i];
            c.due = Some(due(next));
            next += 1;
            c.unsent = request.len();
            if let Err(why) = send(&epoll, c, i, &request, false)? {
                fail(&mut out, why);
                reconnect(&epoll, &addr, c, i)?;
                idle.push(i);
            }
        }
        let busy = conns.iter().filter(|c| c.due.is_some()).count();
        let sending = next < total;
        if !sending && busy == 0 {
            break;
        }
        if now > end {
            for _ in 0..busy {
                fail(&mut out, "no response within the grace period".into());
            }
            out.unsent = total - next;
            break;
        }
        // Sleep until the next request is due (when a connection is free to send it) or I/O.
        let timeout_ms = if sending && !idle.is_empty() {
            let ticks =
                (due(next).saturating_duration_since(start).as_nanos()).div_ceil(TICK.as_nanos());
            let tick = start + TICK * ticks as u32;
            if armed != Some(tick) {
                // From the time now, not the loop's start: the sends above took some of it.
                timer.arm(tick.saturating_duration_since(Instant::now()))?;
                armed = Some(tick);
            }
            -1
        } else {
            100
        };
        let n = epoll.wait(&mut events, timeout_ms)?;
        for event in &events[..n] {
            let token = event.u64;
            if token == TIMER {
                timer.clear();
                armed = None;
                continue;
            }
            let i = token as usize;
            let c = &mut conns[i];
            if c.unsent > 0 && event.events & libc::EPOLLOUT as u32 != 0 {
                if let Err(why) = send(&epoll, c, i, &request, true)? {
                    fail(&mut out, why);
                    reconnect(&epoll, &addr, c, i)?;
                    idle.push(i);
                    continue;
                }
            }
            if event.events & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 == 0 {
                continue;
            }
            let read = match (&c.stream).read(&mut chunk) {
                Ok(0) => Err("the server closed the connection".to_string()),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => Err(format!("recv: {e}")),
            };
            // An idle connection is in `idle` already: only a busy one goes back there.
            let busy = c.due.is_some() || c.unsent > 0;
            let n = match read {
                Ok(n) => n,
                Err(why) => {
                    if busy {
                        fail(&mut out, why);
                    }
                    reconnect(&epoll, &addr, c, i)?;
                    if busy {
                        idle.push(i);
                    }
                    continue;
                }
            };
            c.buf.extend_from_slice(&chunk[..n]);
            match progress(&c.buf) {
                Progress::Incomplete => {}
                Progress::Done { status, close } if busy => {
                    let due = c.due.take().unwrap_or(start);
                    let us = Instant::now().saturating_duration_since(due).as_micros() as u64;
                    out.latency_us.saturating_record(us.max(1));
                    out.requests += 1;
                    out.non2xx += u64::from(!(200..300).contains(&status));
                    c.buf.clear();
                    if close {
                        reconnect(&epoll, &addr, c, i)?;
                    }
                    idle.push(i);
                }
                Progress::Done { .. } => {
                    fail(&mut out, "a response with no request in flight".into());
                    reconnect(&epoll, &addr, c, i)?;
                }
                Progress::Invalid(why) => {
                    fail(&mut out, why);
                    reconnect(&epoll, &addr, c, i)?;
                    if busy {
                        idle.push(i);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Counts a transport error, keeping the first one's text.
fn fail(out: &mut Run, why: String) {
    out.errors += 1;
    out.first_error.get_or_insert(why);
}

/// Writes the last `c.unsent` bytes of `request` on `c`, and watches it for writability while some
/// stay unsent (`watching`: it is already). The inner error is a transport error's text.
fn send(
    epoll: &Epoll,
    c: &mut Conn,
    i: usize,
    request: &[u8],
    watching: bool,
) -> io::Result<Result<(), String>> {
    let from = request.len() - c.unsent;
    c.unsent -= match (&c.stream).write(&request[from..]) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Ok(Err(format!("send: {e}"))),
    };
    if watching != (c.unsent > 0) {
        let out = if c.unsent > 0 { libc::EPOLLOUT } else { 0 };
        epoll.ctl(
            libc::EPOLL_CTL_MOD,
            c.stream.as_raw_fd(),
            (libc::EPOLLIN | out) as u32,
            i as u64,
        )?;
    }
    Ok(Ok(()))
}

/// Replaces `c`'s connection with a new one (its request in flight, if any, is lost).
fn reconnect(epoll: &Epoll, addr: &std::net::SocketAddr, c: &mut Conn, i: usize) -> io::Result<()> {
    let _ = epoll.ctl(libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), 0, i as u64);
    c.stream = connect(addr)?;
    c.due = None;
    c.unsent = 0;
    c.buf.clear();
    epoll.ctl(
        libc::EPOLL_CTL_ADD,
        c.stream.as_raw_fd(),
        libc::EPOLLIN as u32,
        i as u64,
    )
}

fn main() {
    let Some(args) = parse_args() else {
        println!(
            "rate: the constant-rate load generator of benches/tail.py (usage: rate URL RATE SECONDS \
             CONNECTIONS [BODY]); nothing to measure on its own"
        );
        return;
    };
    let run = match run(&args) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("rate: {e}");
            std::process::exit(1);
        }
    };
    let ms = |q: f64| run.latency_us.value_at_quantile(q) as f64 / 1e3;
    let report = serde_json::json!({
        "asked": args.rate,
        "rps": run.requests as f64 / args.seconds,
        "requests": run.requests,
        "unsent": run.unsent,
        "non2xx": run.non2xx,
        "errors": run.errors,
        "first_error": run.first_error,
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": run.latency_us.max() as f64 / 1e3,
    });
    println!("{report}");
}
