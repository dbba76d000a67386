//! The CPU priority of signal work: the evaluation threads (`eval`) and the `local` embedder's compute
//! pool both drop to it, so it lives here, below both.

/// Evaluation yields the CPU to traffic: a sidecar usually has one core, and an evaluation costs more
/// than proxying the request it scores. The thread runs under `SCHED_IDLE`: it gets the CPU only when no
/// normal thread wants it, and a proxy thread that wakes up preempts it at once. Nice 19 is not enough
/// on its own: the kernel still lets a nice-19 thread finish its time slice (milliseconds) before a
/// waking proxy thread runs, and a thread that used its slice is then kept off the CPU for ~100 ms of
/// the others' time. When the idle CPU is not enough the queue fills and samples are dropped (counted)
/// instead of requests slowing down. Where `SCHED_IDLE` is refused, nice 19 is the fallback.
pub fn lower_priority() {
    // SAFETY: sched_setscheduler reads `param` only; with pid 0 it applies to the calling thread.
    let idle = unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param)
    };
    if idle == 0 {
        return;
    }
    tracing::debug!(error = %std::io::Error::last_os_error(), "cannot run the evaluation thread under SCHED_IDLE; using nice 19");
    // SAFETY: setpriority has no memory effects; on Linux, PRIO_PROCESS with who = 0 is this thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, EVAL_NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the evaluation thread's priority");
    }
}

/// Hands the CPU to any other runnable thread; returns at once when there is none (one system call,
/// well under a microsecond). The evaluation threads call it between evaluations because `SCHED_IDLE`
/// alone does not keep them off a busy core: the fair scheduler still picks an idle-policy thread at a
/// scheduler tick once the proxy thread has run past its share, and the idle thread then keeps the CPU
/// until the next tick (4 ms at HZ=250) while the proxy thread waits runnable — a wake-up would preempt
/// it at once, but a proxy thread that never slept is not woken. `perf sched` showed those 4 ms waits
/// about every two seconds at 80 % load (`benches/schedwait.py`); with the yield they are gone.
pub fn yield_to_traffic() {
    // SAFETY: sched_yield takes no arguments and has no memory effects.
    unsafe { libc::sched_yield() };
}

/// Back from `SCHED_IDLE` to nice 19 — for a shutdown's last evaluations, which must finish within a
/// deadline even when other processes keep the host busy (under `SCHED_IDLE` they might never run).
/// Best effort: without CAP_SYS_NICE the kernel may refuse, and the thread stays idle-only.
pub fn drain_priority() {
    // SAFETY: as in `lower_priority`.
    let rc = unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_OTHER, &param)
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot raise the evaluation thread for the shutdown's flush");
        return;
    }
    // SAFETY: as in `lower_priority`.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, EVAL_NICE) };
}

const EVAL_NICE: libc::c_int = 19;
