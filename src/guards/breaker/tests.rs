//! Unit tests of the breaker: state transitions, rates, half-open probes, settings changes.

use super::*;

const SEC: Duration = Duration::from_secs(1);
const FAST: Duration = Duration::from_millis(10);

fn settings() -> BreakerSettings {
    BreakerSettings {
        window: Duration::from_secs(10),
        failure_rate: 0.5,
        min_calls: 20,
        slow_call: Duration::from_secs(5),
        slow_call_rate: 0.8,
        open_for: Duration::from_secs(10),
        half_open_probes: 3,
    }
}

/// One request through a closed breaker.
fn call(b: &Breaker, now: Instant, duration: Duration, failed: bool) {
    match b.admit(now) {
        BreakerAdmission::Allowed(ticket) => {
            assert!(!ticket.is_probe());
            ticket.complete(now, duration, failed);
        }
        BreakerAdmission::Rejected { .. } => panic!("rejected while {:?}", b.state(now)),
    }
}

fn calls(b: &Breaker, now: Instant, n: usize, duration: Duration, failed: bool) {
    for _ in 0..n {
        call(b, now, duration, failed);
    }
}

fn allowed(admission: BreakerAdmission) -> Ticket {
    match admission {
        BreakerAdmission::Allowed(ticket) => ticket,
        BreakerAdmission::Rejected { retry_after } => {
            panic!("rejected, retry after {retry_after:?}")
        }
    }
}

fn retry_after(admission: BreakerAdmission) -> Duration {
    match admission {
        BreakerAdmission::Allowed(ticket) => panic!("allowed {ticket:?}"),
        BreakerAdmission::Rejected { retry_after } => retry_after,
    }
}

/// A breaker opened at `t0 + 1s` by 20 failures; returns the time it opened.
fn opened(b: &Breaker, t0: Instant) -> Instant {
    let at = t0 + SEC;
    calls(b, at, 20, FAST, true);
    assert_eq!(b.state(at), State::Open);
    at
}

/// Past the longest jittered open interval.
fn after_open(opened_at: Instant) -> Instant {
    opened_at + settings().open_for.mul_f64(1.0 + JITTER) + Duration::from_millis(1)
}

#[test]
fn stays_closed_below_min_calls_even_at_all_failures() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    calls(&b, t0, 19, FAST, true);
    assert_eq!(b.state(t0), State::Closed);
    assert_eq!(
        b.counts(t0),
        Counts {
            calls: 19,
            failures: 19,
            slow: 0
        }
    );
    call(&b, t0, FAST, true);
    assert_eq!(b.state(t0), State::Open);
}

#[test]
fn opens_at_the_failure_rate() {
    let t0 = Instant::now();
    let below = Breaker::new(settings(), t0);
    calls(&below, t0, 11, FAST, false);
    calls(&below, t0, 9, FAST, true);
    assert_eq!(below.state(t0), State::Closed, "9/20 < 0.5");

    let at = Breaker::new(settings(), t0);
    calls(&at, t0, 10, FAST, false);
    calls(&at, t0, 9, FAST, true);
    assert_eq!(at.state(t0), State::Closed, "19 calls < min_calls");
    call(&at, t0, FAST, true);
    assert_eq!(at.state(t0), State::Open, "10/20 = 0.5");
}

#[test]
fn a_success_that_reaches_min_calls_can_open() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    calls(&b, t0, 19, FAST, true);
    call(&b, t0, FAST, false);
    assert_eq!(b.state(t0), State::Open, "19/20 failed");
}

#[test]
fn opens_on_the_slow_call_rate() {
    let t0 = Instant::now();
    let slow = settings().slow_call;
    let below = Breaker::new(settings(), t0);
    calls(&below, t0, 5, FAST, false);
    calls(&below, t0, 15, slow, false);
    assert_eq!(below.state(t0), State::Closed, "15/20 < 0.8");

    let at = Breaker::new(settings(), t0);
    calls(&at, t0, 4, FAST, false);
    calls(&at, t0, 16, slow, false);
    assert_eq!(at.state(t0), State::Open, "16/20 = 0.8");
    assert_eq!(at.counts(t0).slow, 16);
}

#[test]
fn rejects_while_open_with_the_remaining_time() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let opened_at = opened(&b, t0);
    let open_for = settings().open_for;
    let now = opened_at + 3 * SEC;
    let wait = retry_after(b.admit(now));
    let elapsed = 3 * SEC;
    assert!(wait >= open_for.mul_f64(1.0 - JITTER) - elapsed, "{wait:?}");
    assert!(wait <= open_for.mul_f64(1.0 + JITTER) - elapsed, "{wait:?}");
    assert_eq!(b.state(now), State::Open);
}

#[test]
fn open_intervals_are_jittered() {
    let t0 = Instant::now();
    let waits: Vec<Duration> = (0..50)
        .map(|_| {
            let b = Breaker::new(settings(), t0);
            retry_after(b.admit(opened(&b, t0)))
        })
        .collect();
    let open_for = settings().open_for;
    for w in &waits {
        assert!(*w >= open_for.mul_f64(1.0 - JITTER) && *w <= open_for.mul_f64(1.0 + JITTER));
    }
    assert!(
        waits.iter().any(|w| *w != waits[0]),
        "50 breakers opened at the same time all wait {:?}",
        waits[0]
    );
}

#[test]
fn half_opens_after_open_for() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let opened_at = opened(&b, t0);
    let early = opened_at + settings().open_for.mul_f64(1.0 - JITTER) - Duration::from_millis(1);
    assert_eq!(b.state(early), State::Open);
    assert_eq!(
        b.state(after_open(opened_at)),
        State::HalfOpen,
        "before any request"
    );
    assert_eq!(State::HalfOpen.as_metric(), 2);
}

#[test]
fn admits_at_most_half_open_probes_at_once() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let now = after_open(opened(&b, t0));
    let probes: Vec<Ticket> = (0..3).map(|_| allowed(b.admit(now))).collect();
    assert!(probes.iter().all(Ticket::is_probe));
    assert_eq!(retry_after(b.admit(now)), HALF_OPEN_RETRY_AFTER);
    assert_eq!(b.state(now), State::HalfOpen);
    for probe in probes {
        probe.complete(now, FAST, false);
    }
}

#[test]
fn enough_good_probes_close_it_with_an_empty_window() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let now = after_open(opened(&b, t0));
    let probes: Vec<Ticket> = (0..3).map(|_| allowed(b.admit(now))).collect();
    for (i, probe) in probes.into_iter().enumerate() {
        assert_eq!(b.state(now), State::HalfOpen, "after {i} good probes");
        probe.complete(now, FAST, false);
    }
    assert_eq!(b.state(now), State::Closed);
    assert_eq!(b.counts(now), Counts::default());
    // The 20 failures that opened it are gone: one more failure does not reopen it.
    call(&b, now, FAST, true);
    assert_eq!(b.state(now), State::Closed);
}

#[test]
fn one_failed_probe_reopens_it() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let now = after_open(opened(&b, t0));
    let good = allowed(b.admit(now));
    let bad = allowed(b.admit(now));
    good.complete(now, FAST, false);
    bad.complete(now, FAST, true);
    assert_eq!(b.state(now), State::Open);
    let wait = retry_after(b.admit(now));
    assert!(
        wait >= settings().open_for.mul_f64(1.0 - JITTER),
        "{wait:?}"
    );
    assert_eq!(b.state(after_open(now)), State::HalfOpen);
}

#[test]
fn a_slow_probe_reopens_it() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let now = after_open(opened(&b, t0));
    allowed(b.admit(now)).complete(now, settings().slow_call, false);
    assert_eq!(b.state(now), State::Open);
}

#[test]
fn outcomes_from_an_earlier_phase_are_ignored() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let late = allowed(b.admit(t0));
    let opened_at = opened(&b, t0);
    let now = after_open(opened_at);
    let stale_probe = allowed(b.admit(now));
    allowed(b.admit(now)).complete(now, FAST, true); // reopens
    let now = after_open(now);
    assert_eq!(b.state(now), State::HalfOpen);
    // A failure admitted while closed and a probe of the previous half-open period change nothing.
    late.complete(now, FAST, true);
    stale_probe.complete(now, FAST, true);
    assert_eq!(b.state(now), State::HalfOpen);
    let probes: Vec<Ticket> = (0..3).map(|_| allowed(b.admit(now))).collect();
    assert!(matches!(b.admit(now), BreakerAdmission::Rejected { .. }));
    drop(probes);
}

#[test]
fn failures_older_than_the_window_age_out() {
    let t0 = Instant::now();
    let window = settings().window;

    let within = Breaker::new(settings(), t0);
    calls(&within, t0, 19, FAST, true);
    call(&within, t0 + window / 2, FAST, false);
    assert_eq!(within.state(t0 + window / 2), State::Open);

    let aged = Breaker::new(settings(), t0);
    calls(&aged, t0, 19, FAST, true);
    let later = t0 + window;
    assert_eq!(aged.counts(later), Counts::default());
    calls(&aged, later, 19, FAST, false);
    call(&aged, later, FAST, true);
    assert_eq!(
        aged.state(later),
        State::Closed,
        "1/20 failed in the window"
    );
    assert_eq!(aged.counts(later).calls, 20);
}

#[test]
fn a_dropped_ticket_frees_its_probe_slot() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let now = after_open(opened(&b, t0));
    let mut probes: Vec<Ticket> = (0..3).map(|_| allowed(b.admit(now))).collect();
    assert!(matches!(b.admit(now), BreakerAdmission::Rejected { .. }));
    drop(probes.pop());
    probes.push(allowed(b.admit(now)));
    assert!(matches!(b.admit(now), BreakerAdmission::Rejected { .. }));
    // The dropped probe counted as neither: three good ones are still needed.
    let last = probes.pop().unwrap();
    for probe in probes {
        probe.complete(now, FAST, false);
    }
    assert_eq!(b.state(now), State::HalfOpen);
    last.complete(now, FAST, false);
    assert_eq!(b.state(now), State::Closed);
}

#[test]
fn set_settings_keeps_the_state() {
    let t0 = Instant::now();
    let b = Breaker::new(settings(), t0);
    let opened_at = opened(&b, t0);
    let before = retry_after(b.admit(opened_at));
    b.set_settings(settings().tightened(0.5));
    assert_eq!(b.state(opened_at), State::Open);
    assert_eq!(retry_after(b.admit(opened_at)), before);
    assert_eq!(b.settings(), settings().tightened(0.5));

    // Closed, the window's counts survive a change of thresholds, and the new ones apply to them.
    let closed = Breaker::new(settings(), t0);
    calls(&closed, t0, 15, FAST, false);
    calls(&closed, t0, 5, FAST, true);
    assert_eq!(closed.state(t0), State::Closed, "5/20 < 0.5");
    closed.set_settings(settings().tightened(0.4));
    assert_eq!(closed.counts(t0).calls, 20);
    call(&closed, t0, FAST, false);
    assert_eq!(closed.state(t0), State::Open, "5/21 ≥ 0.2");

    // A new window length starts an empty window.
    let resized = Breaker::new(settings(), t0);
    calls(&resized, t0, 5, FAST, true);
    resized.set_settings(BreakerSettings {
        window: Duration::from_secs(30),
        ..settings()
    });
    assert_eq!(resized.counts(t0), Counts::default());
    assert_eq!(resized.state(t0), State::Closed);
}

#[test]
fn tightened_scales_rates_and_open_for() {
    let t = settings().tightened(0.5);
    assert_eq!(t.failure_rate, 0.25);
    assert_eq!(t.slow_call_rate, 0.4);
    assert_eq!(t.open_for, Duration::from_secs(20));
    assert_eq!(
        (t.window, t.min_calls, t.slow_call, t.half_open_probes),
        (
            settings().window,
            settings().min_calls,
            settings().slow_call,
            settings().half_open_probes
        )
    );
    assert_eq!(settings().tightened(1.0), settings());
    assert_eq!(settings().tightened(2.0), settings(), "clamped to 1");
    assert_eq!(settings().tightened(f64::NAN), settings());
    let floor = settings().tightened(0.0);
    assert_eq!(floor.failure_rate, 0.5 * MIN_TIGHTEN_FACTOR);
    assert_eq!(floor.open_for, Duration::from_secs(1000));
}

#[test]
fn from_config_defaults() {
    let s = BreakerSettings::from(&config::Breaker::default());
    assert_eq!(s.window, Duration::from_secs(10));
    assert_eq!(s.failure_rate, 0.5);
    assert_eq!(s.min_calls, 20);
    assert_eq!(s.slow_call, Duration::from_secs(5));
    assert_eq!(s.slow_call_rate, 0.8);
    assert_eq!(s.open_for, Duration::from_secs(10));
    assert_eq!(s.half_open_probes, 5);
}

#[test]
fn state_names_and_metric_values() {
    let all = [State::Closed, State::Open, State::HalfOpen];
    assert_eq!(all.map(State::as_metric), [0, 1, 2]);
    assert_eq!(all.map(State::as_str), ["closed", "open", "half_open"]);
}

#[test]
fn concurrent_closed_calls_all_count() {
    let t0 = Instant::now();
    let b = Breaker::new(
        BreakerSettings {
            min_calls: 1,
            ..settings()
        },
        t0,
    );
    let now = t0 + SEC;
    std::thread::scope(|s| {
        for _ in 0..4 {
            let b = b.clone();
            s.spawn(move || {
                for i in 0..10_000 {
                    let ticket = allowed(b.admit(now));
                    // Every 10th fails and every 5th is slow, never the first: both shares stay under
                    // their rates at every point of every interleaving.
                    let duration = if i % 5 == 4 {
                        settings().slow_call
                    } else {
                        FAST
                    };
                    ticket.complete(now, duration, i % 10 == 9);
                }
            });
        }
    });
    assert_eq!(
        b.counts(now),
        Counts {
            calls: 40_000,
            failures: 4_000,
            slow: 8_000
        }
    );
    assert_eq!(b.state(now), State::Closed);
}
