//! The coarse clock the request path reads instead of `clock_gettime` (which cost more than the
//! rest of `try_spend` in a profile, docs/benchmarks.md).
//!
//! One thread per process advances it every [`TICK`]: it keeps moving whatever the agent is doing
//! (a settle call blocked by a partitioned store included), so a lease stops being spendable at
//! its deadline measured on this node's own clock, not when the agent next gets to look.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the clock advances: the request path may be this late to see a deadline.
pub const TICK: Duration = Duration::from_millis(5);

static START: OnceLock<Instant> = OnceLock::new();
static NOW_MS: AtomicU64 = AtomicU64::new(0);
static RUNNING: OnceLock<Result<(), String>> = OnceLock::new();

fn start() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Milliseconds since the clock started, at most [`TICK`] behind (never ahead).
#[inline]
pub fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}

/// Reads the real clock and publishes it (the ticker thread, and the agent on each round as a
/// second source). Never moves backwards.
pub fn advance() -> u64 {
    let now = start().elapsed().as_millis() as u64;
    NOW_MS.fetch_max(now, Ordering::Relaxed);
    now
}

/// Converts an instant to this clock's milliseconds (rounded down, so a deadline computed from
/// it is never later than the real one).
pub fn ms_of(t: Instant) -> u64 {
    t.saturating_duration_since(start()).as_millis() as u64
}

/// Starts the ticker thread once per process; an error when the thread cannot be created (then
/// no deadline could be trusted, and metering must not start).
pub fn ensure_running() -> Result<(), String> {
    RUNNING
        .get_or_init(|| {
            advance();
            std::thread::Builder::new()
                .name("tollgate-clock".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(TICK);
                        advance();
                    }
                })
                .map(|_| ())
                .map_err(|e| format!("cannot start the coarse clock thread: {e}"))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_advances_on_its_own() {
        ensure_running().unwrap();
        let a = now_ms();
        let t = Instant::now();
        // Nobody but the ticker thread advances it here.
        while now_ms() < a + 40 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the clock is stuck at {a}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(now_ms() <= advance(), "never ahead of the real clock");
    }
}
