//! Admission limits shared by all sessions: open sessions per client address, and bytes of
//! message content held in memory while it is being received.
//!
//! Both protect the node from one client or a burst of large messages: a session over the
//! per-client limit gets `421 4.7.0` at once; a session's content goes to its queue file as it
//! arrives once it reaches `limits.contentSpillBytes`, or at once when the content of all
//! sessions together would pass the budget, so the pod stays inside its memory limit however
//! many large messages arrive together, and none of them is refused for it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Open sessions per client address.
#[derive(Debug)]
pub struct ClientSlots {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One session's slot; freed when dropped.
#[derive(Debug)]
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    ip: IpAddr,
}

impl ClientSlots {
    /// At most `limit` sessions per address (`0`: no limit).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Take a slot for `ip`, or `None` when it already has `limit` sessions open.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if self.limit > 0 && *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: Arc::clone(self),
            ip,
        })
    }

    /// Sessions open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Bytes of a received message's content still counted against the budget after it was
/// received, until it is queued (or refused): given back when dropped.
#[derive(Debug)]
pub struct Hold {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Hold {
    /// Take over `bytes` already reserved from `budget`.
    pub fn new(budget: Arc<MemoryBudget>, bytes: u64) -> Self {
        Self { budget, bytes }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// How much received content a session keeps in memory before it goes to the queue file.
#[derive(Debug, Clone)]
pub struct ContentMemory {
    /// Shared by all sessions.
    pub budget: Arc<MemoryBudget>,
    /// A session's content goes to disk when it reaches this many bytes.
    pub spill_at: u64,
}

/// Bytes of message content held in memory by all sessions together.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// Reserve `n` bytes; false (and nothing reserved) if that would exceed the limit.
    pub fn try_reserve(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    /// Give back `n` reserved bytes.
    pub fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_slots_limit_per_address_and_free_on_drop() {
        let slots = ClientSlots::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = slots.try_take(a).unwrap();
        let _s2 = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none());
        let _t = slots.try_take(b).unwrap();
        drop(s1);
        assert_eq!(slots.open(a), 1);
        assert!(slots.try_take(a).is_some());
        let unlimited = ClientSlots::new(0);
        let held: Vec<_> = (0..100).map(|_| unlimited.try_take(a).unwrap()).collect();
        assert_eq!(unlimited.open(a), held.len());
    }

    #[test]
    fn budget_refuses_what_does_not_fit_and_takes_it_back() {
        let b = MemoryBudget::new(100);
        assert!(b.try_reserve(60));
        assert!(!b.try_reserve(41));
        assert_eq!(b.used(), 60);
        assert!(b.try_reserve(40));
        b.release(60);
        assert!(b.try_reserve(60));
        b.release(1000);
        assert_eq!(b.used(), 0);
    }
}
