//! The chain's clock, as the write-off deadline reads it.

use std::time::Instant;

/// The chain's clock as last read, carried forward by this node's monotonic clock (so a
/// grace period still ends while the chain cannot be reached), and never behind the system
/// clock: a node that reports an old head must not push a write-off past the moment the payer
/// can withdraw.
#[derive(Default)]
pub struct ChainClock {
    seen: std::sync::Mutex<Option<(u64, Instant)>>,
}

impl ChainClock {
    pub fn observe(&self, chain_s: u64) {
        if let Ok(mut g) = self.seen.lock() {
            let keep = g.is_some_and(|(t, at)| t.saturating_add(at.elapsed().as_secs()) > chain_s);
            if !keep {
                *g = Some((chain_s, Instant::now()));
            }
        }
    }

    /// Chain time now (Unix seconds).
    pub fn now(&self) -> u64 {
        let system = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let seen = self.seen.lock().ok().and_then(|g| *g);
        match seen {
            Some((t, at)) => t.saturating_add(at.elapsed().as_secs()).max(system),
            None => system,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    #[test]
    fn the_chain_clock_is_never_behind_the_system_clock_nor_goes_back() {
        let c = ChainClock::default();
        // A node reporting an old head does not hold the write-off deadline back.
        c.observe(1_000);
        assert!(c.now() >= system_now());
        // A chain ahead of us (its clock moved forward) is followed...
        let ahead = system_now() + 3_600;
        c.observe(ahead);
        assert!(c.now() >= ahead);
        // ...and an older reading after it changes nothing.
        c.observe(ahead - 600);
        assert!(c.now() >= ahead);
    }
}
