//! Who a stream's buffers are counted against: an opaque [`Owner`] the
//! caller gives when it starts a stream (`api` passes the client's address,
//! an IPv6 client by its /64), and the per-owner bound on the buffers all of
//! an owner's streams hold at once (`io.owner_buffers`, see the module doc
//! of `io`, "Memory, and fair sharing of it").
//!
//! Each owner with a live stream or buffer has a semaphore of
//! `owner_buffers` permits; a buffer taken for one of its streams carries
//! one of them until it (and every frame made from it) is dropped. The map
//! holds the semaphores weakly: an owner nothing holds any more is forgotten,
//! and dead entries are swept whenever the map has doubled since the last
//! sweep, so it stays bounded by the owners with live streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::Semaphore;

/// An opaque key: streams started with the same owner share one bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner(u128);

impl Owner {
    pub const fn new(key: u128) -> Owner {
        Owner(key)
    }
}

/// The per-owner shares of one engine.
pub(super) struct Owners {
    bound: usize,
    state: Mutex<State>,
    /// Streams that found their owner at its bound and waited.
    waits: AtomicU64,
}

struct State {
    shares: HashMap<Owner, Weak<Semaphore>>,
    /// Entries after the last sweep; the next sweep comes at twice that.
    swept: usize,
}

impl Owners {
    pub(super) fn new(bound: usize) -> Owners {
        Owners {
            bound,
            state: Mutex::new(State {
                shares: HashMap::new(),
                swept: 0,
            }),
            waits: AtomicU64::new(0),
        }
    }

    /// A stream found its owner at its bound and waits.
    pub(super) fn note_wait(&self) {
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Streams that waited for their owner's buffers, since the start.
    pub(super) fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// The share of `owner`: its semaphore, made with `bound` permits if
    /// nothing of that owner is alive.
    pub(super) fn share(&self, owner: Owner) -> Arc<Semaphore> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sem) = s.shares.get(&owner).and_then(Weak::upgrade) {
            return sem;
        }
        if s.shares.len() >= 2 * s.swept.max(16) {
            s.shares.retain(|_, w| w.strong_count() > 0);
            s.swept = s.shares.len();
        }
        let sem = Arc::new(Semaphore::new(self.bound));
        s.shares.insert(owner, Arc::downgrade(&sem));
        sem
    }

    /// Owners remembered now (live ones and those not yet swept).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shares
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_share_one_semaphore_and_are_forgotten() {
        let owners = Owners::new(3);
        let a = owners.share(Owner::new(1));
        let a2 = owners.share(Owner::new(1));
        assert!(Arc::ptr_eq(&a, &a2));
        let b = owners.share(Owner::new(2));
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(b.available_permits(), 3);
        drop((a, a2, b));
        for i in 0..100 {
            drop(owners.share(Owner::new(i)));
        }
        assert!(
            owners.len() <= 32,
            "dead owners are swept: {}",
            owners.len()
        );
    }
}
