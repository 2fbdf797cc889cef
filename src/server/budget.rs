//! The connection budget: how many connections the service holds, how many
//! one address may hold, and the share kept for addresses that are not
//! flooding.
//!
//! Three limits, checked at accept, before the TLS handshake costs anything:
//!
//! - `api.max_connections` in all (the hard cap: file descriptors, memory);
//! - `api.max_connections_per_address` per client address (an IPv6 client
//!   counts per /64, as the login limiter does: one host usually owns a
//!   whole /64), so one scanner cannot take the budget;
//! - `api.reserved_connections`: once fewer than that many are free, only
//!   *light* addresses are admitted, those holding fewer than a quarter of
//!   the per-address cap. A flood from several addresses fills the rest of
//!   the budget and stops there; an honest client with a few connections
//!   still gets in.
//!
//! A refused connection is closed at once (no TLS, no answer): the state of
//! the budget is one mutex-held map, bounded by `max_connections` entries
//! since an address with no connection is removed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

// The key an address is counted under (IPv6 per /64): the same one the
// login limiter and the io core's per-owner bound use.
use crate::api::auth::address_key;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `api.max_connections` are open.
    Full,
    /// This address holds `api.max_connections_per_address`.
    AddressCap,
    /// Only the reserved share is left, and this address is not light.
    Reserved,
}

impl Refusal {
    /// A bounded label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Full => "max_connections",
            Refusal::AddressCap => "per_address",
            Refusal::Reserved => "reserved",
        }
    }
}

/// The budget's limits, validated by the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max: usize,
    pub per_address: usize,
    pub reserved: usize,
}

impl Limits {
    /// Connections an address may hold and still count as light.
    pub fn light(&self) -> usize {
        (self.per_address / 4).max(1)
    }
}

/// The connections held now, by address.
pub struct Budget {
    limits: Limits,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One admitted connection; its place in the budget is given back on drop.
pub struct Ticket {
    budget: Arc<Budget>,
    key: IpAddr,
}

impl Budget {
    pub fn new(limits: Limits) -> Arc<Budget> {
        Arc::new(Budget {
            limits,
            held: Mutex::new(Held::default()),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // Counters only: a poisoned lock is still right.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admit a connection from `addr`, or say why not.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Result<Ticket, Refusal> {
        let key = address_key(addr);
        let l = self.limits;
        let mut held = self.held();
        let mine = held.by_address.get(&key).copied().unwrap_or(0);
        if held.total >= l.max {
            return Err(Refusal::Full);
        }
        if mine >= l.per_address {
            return Err(Refusal::AddressCap);
        }
        if held.total >= l.max.saturating_sub(l.reserved) && mine >= l.light() {
            return Err(Refusal::Reserved);
        }
        held.total += 1;
        *held.by_address.entry(key).or_insert(0) += 1;
        Ok(Ticket {
            budget: Arc::clone(self),
            key,
        })
    }

    /// Connections held now: in all, and by `addr`.
    pub fn held_by(&self, addr: IpAddr) -> (usize, usize) {
        let held = self.held();
        let mine = held
            .by_address
            .get(&address_key(addr))
            .copied()
            .unwrap_or(0);
        (held.total, mine)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = self.budget.held();
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_address.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.by_address.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_cap_and_reserved_share() {
        let b = Budget::new(Limits {
            max: 16,
            per_address: 8,
            reserved: 4,
        });
        let flood = ip("192.0.2.1");
        let mut tickets: Vec<Ticket> = (0..8).map(|_| b.admit(flood).unwrap()).collect();
        assert_eq!(b.admit(flood).err(), Some(Refusal::AddressCap));
        // A second flooding address fills up to the reserve and no further.
        let flood2 = ip("192.0.2.2");
        for _ in 0..4 {
            tickets.push(b.admit(flood2).unwrap());
        }
        assert_eq!(b.admit(flood2).err(), Some(Refusal::Reserved));
        // Light addresses (fewer than 8/4 = 2 connections) still get in.
        let honest = ip("198.51.100.7");
        tickets.push(b.admit(honest).unwrap());
        tickets.push(b.admit(honest).unwrap());
        assert_eq!(b.admit(honest).err(), Some(Refusal::Reserved));
        tickets.push(b.admit(ip("198.51.100.8")).unwrap());
        tickets.push(b.admit(ip("198.51.100.9")).unwrap());
        assert_eq!(b.held_by(honest), (16, 2));
        assert_eq!(b.admit(ip("198.51.100.10")).err(), Some(Refusal::Full));
        // Tickets give their place back; empty addresses are forgotten.
        tickets.clear();
        assert_eq!(b.held_by(flood), (0, 0));
        assert!(b.held().by_address.is_empty());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let b = Budget::new(Limits {
            max: 100,
            per_address: 2,
            reserved: 0,
        });
        let _a = b.admit(ip("2001:db8::1")).unwrap();
        let _b = b.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(b.admit(ip("2001:db8::3")).err(), Some(Refusal::AddressCap));
        let _c = b.admit(ip("2001:db8:0:1::1")).unwrap();
        let _d = b.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(b.held_by(ip("192.0.2.1")), (4, 1));
    }
}
