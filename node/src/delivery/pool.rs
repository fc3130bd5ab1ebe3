//! Per-destination connection pools: a concurrency limit per destination and idle
//! connections kept for the next message to the same host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::client::Connection;

/// The pools.
#[derive(Debug)]
pub struct Pool {
    per_destination: usize,
    idle_for: Duration,
    /// Per destination: its connection limit and the semaphore holding it.
    limits: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    idle: Mutex<HashMap<String, Vec<Connection>>>,
}

impl Pool {
    /// New pools: at most `per_destination` connections per destination; idle connections
    /// kept `idle_for`.
    pub fn new(per_destination: usize, idle_for: Duration) -> Self {
        Self {
            per_destination: per_destination.max(1),
            idle_for,
            limits: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// Wait for a slot to the destination, which has at most `limit` (`0`: the pools'
    /// default). A changed limit (a reload) applies to connections opened from then on.
    pub async fn acquire(&self, destination: &str, limit: u32) -> Option<OwnedSemaphorePermit> {
        let limit = match usize::try_from(limit) {
            Ok(0) | Err(_) => self.per_destination,
            Ok(n) => n,
        };
        let sem = {
            let mut l = self.limits.lock().ok()?;
            let entry = l
                .entry(destination.to_owned())
                .or_insert_with(|| (limit, Arc::new(Semaphore::new(limit))));
            if entry.0 != limit {
                *entry = (limit, Arc::new(Semaphore::new(limit)));
            }
            Arc::clone(&entry.1)
        };
        sem.acquire_owned().await.ok()
    }

    /// An idle connection for `key` (host, address and session settings), if a fresh one is
    /// kept.
    pub fn take(&self, key: &str) -> Option<Connection> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if c.last_used.elapsed() < self.idle_for {
                return Some(c);
            }
        }
        None
    }

    /// Keep a connection for reuse; returns it back when it should be closed instead.
    pub fn put(&self, key: &str, conn: Connection) -> Option<Connection> {
        if self.idle_for.is_zero() {
            return Some(conn);
        }
        let Ok(mut idle) = self.idle.lock() else {
            return Some(conn);
        };
        let list = idle.entry(key.to_owned()).or_default();
        if list.len() >= self.per_destination {
            return Some(conn);
        }
        list.push(conn);
        None
    }

    /// Remove connections idle too long (they are closed by the caller).
    pub fn expired(&self) -> Vec<Connection> {
        let mut out = Vec::new();
        if let Ok(mut idle) = self.idle.lock() {
            let now = Instant::now();
            for list in idle.values_mut() {
                let (keep, old): (Vec<_>, Vec<_>) = std::mem::take(list)
                    .into_iter()
                    .partition(|c| now.duration_since(c.last_used) < self.idle_for);
                *list = keep;
                out.extend(old);
            }
            idle.retain(|_, l| !l.is_empty());
        }
        out
    }

    /// All idle connections (at shutdown).
    pub fn drain(&self) -> Vec<Connection> {
        self.idle
            .lock()
            .map(|mut i| i.drain().flat_map(|(_, v)| v).collect())
            .unwrap_or_default()
    }
}
