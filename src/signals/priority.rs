//! The CPU priority of signal work: the evaluation threads (`eval`) and the `local` embedder's compute
//! pool both drop to it, so it lives here, below both.

/// Evaluation yields the CPU to traffic: a sidecar usually has one core, and an evaluation costs more
/// than proxying the request it scores. At nice 19 the workers take what the proxy leaves; when that is
/// not enough the queue fills and samples are dropped (counted) instead of requests slowing down.
pub fn lower_priority() {
    // SAFETY: setpriority has no memory effects; on Linux, PRIO_PROCESS with who = 0 is this thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, EVAL_NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the evaluation thread's priority");
    }
}

const EVAL_NICE: libc::c_int = 19;
