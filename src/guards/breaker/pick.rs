//! The breaker step of the request path (SPEC §5): `serve::handle` asks [`pick`] which arm's breaker
//! lets the request through — its own arm's, else `breaker.degrade_target`'s — or gets [`BreakerOpen`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Breaker, BreakerAdmission, Ticket};

/// What carries a breaker: an arm of the routing table (`serve` implements it), so the step below can
/// pick between arms without knowing what they are.
pub trait HasBreaker {
    fn breaker(&self) -> &Breaker;
}

impl<T: HasBreaker> HasBreaker for Arc<T> {
    #[inline]
    fn breaker(&self) -> &Breaker {
        (**self).breaker()
    }
}

/// The arm that takes a request and its breaker ticket.
pub struct Picked<'a, A> {
    pub arm: &'a A,
    pub ticket: Ticket,
    /// The request's own arm was open and `breaker.degrade_target` took it.
    pub fell_back: bool,
}

/// Refused: the arm's breaker is open and no degrade target could take the request (SPEC §5: 503
/// `breaker_open` with `x-driftguard-breaker: open`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerOpen {
    pub retry_after: Duration,
}

impl BreakerOpen {
    /// `retry_after` in whole seconds for the `Retry-After` header, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// The breaker step: the arm's own breaker admits the request, else the degrade target's does (asked only
/// when the arm's is open; `degrade_target` returns it unless it is the arm itself), else it is refused.
#[inline]
pub fn pick<'a, A: HasBreaker>(
    arm: &'a A,
    degrade_target: impl FnOnce() -> Option<&'a A>,
) -> Result<Picked<'a, A>, BreakerOpen> {
    match arm.breaker().admit(Instant::now()) {
        BreakerAdmission::Allowed(ticket) => Ok(Picked {
            arm,
            ticket,
            fell_back: false,
        }),
        BreakerAdmission::Rejected { retry_after } => {
            let target =
                degrade_target().and_then(|target| match target.breaker().admit(Instant::now()) {
                    BreakerAdmission::Allowed(ticket) => Some((target, ticket)),
                    BreakerAdmission::Rejected { .. } => None,
                });
            match target {
                Some((arm, ticket)) => Ok(Picked {
                    arm,
                    ticket,
                    fell_back: true,
                }),
                None => Err(BreakerOpen { retry_after }),
            }
        }
    }
}
