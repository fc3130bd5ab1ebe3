//! The scheduler: knows every queued message's next attempt time, starts attempts when
//! they are due (at most `maxDeliveries` at once), handles flush requests, keeps the queue
//! metrics, and on shutdown lets running attempts finish so nothing is sent twice.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::attempt::{Engine, Next};
use super::route::{Sender, domain_of, route_for};
use super::{Cmd, FLUSH_DIR, now_ms};

#[derive(Debug)]
struct Entry {
    due_ms: i64,
    sender: Sender,
    domains: Vec<String>,
    received_ms: i64,
    running: bool,
    flush_again: bool,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    due: BTreeSet<(i64, String)>,
    running: usize,
    destinations: HashSet<String>,
}

impl State {
    fn insert(
        &mut self,
        id: String,
        due_ms: i64,
        sender: Sender,
        domains: Vec<String>,
        received_ms: i64,
    ) {
        if self.entries.contains_key(&id) {
            return;
        }
        self.due.insert((due_ms, id.clone()));
        self.entries.insert(
            id,
            Entry {
                due_ms,
                sender,
                domains,
                received_ms,
                running: false,
                flush_again: false,
            },
        );
    }

    fn make_due(&mut self, domain: Option<&str>, now: i64) -> usize {
        let mut n = 0;
        for (id, e) in &mut self.entries {
            if domain.is_some_and(|d| !e.domains.iter().any(|x| x == d)) {
                continue;
            }
            n += 1;
            if e.running {
                e.flush_again = true;
            } else if e.due_ms > now {
                self.due.remove(&(e.due_ms, id.clone()));
                e.due_ms = now;
                self.due.insert((now, id.clone()));
            }
        }
        n
    }
}

/// Load every message of `active/` not yet known.
async fn scan(engine: &Arc<Engine>, st: &mut State) {
    let q = Arc::clone(&engine.queue);
    let known: HashSet<String> = st.entries.keys().cloned().collect();
    let found = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let Ok(list) = q.list() else { return out };
        for e in list {
            if e.location != crate::queue::Location::Active || known.contains(&e.id) {
                continue;
            }
            match q.read(&e.id) {
                Ok((env, state, _, _)) => {
                    let mut domains: Vec<String> = state
                        .open_recipients()
                        .map(|r| domain_of(&r.address))
                        .collect();
                    domains.sort();
                    domains.dedup();
                    out.push((
                        env.id,
                        state.next_attempt_at * 1000,
                        Sender::new(&env.sender, env.auth_user.as_deref()),
                        domains,
                        env.received_at * 1000,
                    ));
                }
                Err(err) => tracing::warn!(id = %e.id, error = %err, "cannot read queued message"),
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    let n = found.len();
    for (id, due, sender, domains, rec) in found {
        st.insert(id, due, sender, domains, rec);
    }
    if n > 0 {
        tracing::info!(messages = n, "queue scan: messages scheduled");
    }
}

/// Flush requests dropped by `mailnode queue flush`: domains (`None` for all).
fn take_flush_requests(root: &std::path::Path) -> Vec<Option<String>> {
    let dir = root.join(FLUSH_DIR);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let _ = std::fs::remove_file(e.path());
        let d = text.trim().to_ascii_lowercase();
        out.push((!d.is_empty()).then_some(d));
    }
    out
}

fn update_metrics(engine: &Engine, st: &mut State, now: i64) {
    let cfg = engine.cfg();
    let mut per: HashMap<String, i64> = HashMap::new();
    let mut oldest = now;
    for e in st.entries.values() {
        oldest = oldest.min(e.received_ms);
        let mut dests: Vec<String> = e
            .domains
            .iter()
            .map(|d| route_for(&cfg.delivery, &e.sender, d).destination)
            .collect();
        dests.sort();
        dests.dedup();
        for d in dests {
            *per.entry(d).or_default() += 1;
        }
    }
    for d in st.destinations.drain() {
        if !per.contains_key(&d) {
            engine
                .metrics
                .queue_destination
                .get_or_create(&vec![("destination".to_owned(), d)])
                .set(0);
        }
    }
    for (d, n) in per {
        engine
            .metrics
            .queue_destination
            .get_or_create(&vec![("destination".to_owned(), d.clone())])
            .set(n);
        st.destinations.insert(d);
    }
    engine
        .metrics
        .oldest_message_age
        .set((now - oldest).max(0) / 1000);
}

/// Wait for every task of `tasks` to end.
async fn join_all<T: 'static>(tasks: &mut JoinSet<T>) {
    while tasks.join_next().await.is_some() {}
}

/// How long a shutdown waits, after the grace period, for attempts that have sent their
/// message: the reply timeout, plus a little for the attempt to record the answer.
pub fn final_reply_wait(engine: &Engine) -> Duration {
    Duration::from_secs(engine.cfg().delivery.command_timeout_seconds.max(1) + 2)
}

/// Run until `shutdown` is true; then wait (at most `grace`) for running attempts, then give
/// up the ones that have not sent their message and wait for the others' answers.
pub async fn run(
    engine: Arc<Engine>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut st = State::default();
    let _ = std::fs::create_dir_all(engine.queue.root().join(FLUSH_DIR));
    // Both need a restart to change (`Config::restart_view`).
    let (enabled, max) = {
        let d = &engine.cfg().delivery;
        (d.enabled, d.max_deliveries.max(1))
    };
    if !enabled {
        tracing::warn!("delivery is disabled (delivery.enabled: false): mail is only queued");
    }
    engine.refresh_self().await;
    scan(&engine, &mut st).await;
    let mut tasks: JoinSet<(String, Result<Next, crate::queue::QueueError>)> = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        let now = now_ms();
        // Start what is due.
        while st.running < max && enabled {
            let Some((due, id)) = st.due.first().cloned() else {
                break;
            };
            if due > now {
                break;
            }
            st.due.pop_first();
            let Some(e) = st.entries.get_mut(&id) else {
                continue;
            };
            e.running = true;
            st.running += 1;
            let eng = Arc::clone(&engine);
            let rec = e.received_ms;
            tasks.spawn(async move {
                let r = eng.deliver(&id, rec).await;
                (id, r)
            });
        }
        let sleep_ms = st
            .due
            .first()
            .map_or(1000, |(d, _)| (d - now).clamp(0, 1000));
        let sleep_ms = if st.running >= max { 1000 } else { sleep_ms };
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::New { id, sender, domains, received_ms }) => st.insert(id, received_ms, sender, domains, received_ms),
                Some(Cmd::Flush(domain)) => {
                    scan(&engine, &mut st).await;
                    let n = st.make_due(domain.as_deref(), now_ms());
                    tracing::info!(domain = domain.as_deref().unwrap_or("*"), messages = n, "queue flush requested");
                }
                None => {}
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                st.running = st.running.saturating_sub(1);
                match done {
                    Ok((id, res)) => {
                        let next = match res {
                            Ok(n) => n,
                            Err(e) => {
                                tracing::error!(id = %id, error = %e, "delivery attempt failed on the queue; retrying in 60s");
                                let domains = st.entries.get(&id).map(|e| e.domains.clone()).unwrap_or_default();
                                Next::Retry { due_ms: now_ms() + 60_000, domains }
                            }
                        };
                        match next {
                            Next::Done => { st.entries.remove(&id); }
                            Next::Retry { due_ms, domains } => {
                                if let Some(e) = st.entries.get_mut(&id) {
                                    e.running = false;
                                    e.domains = domains;
                                    e.due_ms = if std::mem::take(&mut e.flush_again) { now_ms() } else { due_ms };
                                    st.due.insert((e.due_ms, id));
                                }
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "delivery task panicked"),
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(u64::try_from(sleep_ms).unwrap_or(1000))) => {},
            _ = tick.tick() => {
                ticks += 1;
                for d in take_flush_requests(engine.queue.root()) {
                    scan(&engine, &mut st).await;
                    let n = st.make_due(d.as_deref(), now_ms());
                    tracing::info!(domain = d.as_deref().unwrap_or("*"), messages = n, "queue flush requested (flush file)");
                }
                if ticks.is_multiple_of(30) {
                    scan(&engine, &mut st).await;
                }
                if ticks.is_multiple_of(300) {
                    engine.refresh_self().await;
                }
                update_metrics(&engine, &mut st, now_ms());
                for c in engine.pool.expired() {
                    c.quit().await;
                }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() { break; }
            },
        }
    }
    tracing::info!(
        running = st.running,
        "delivery: shutting down, letting running attempts finish"
    );
    if tokio::time::timeout(grace, join_all(&mut tasks))
        .await
        .is_err()
    {
        tracing::warn!(
            running = tasks.len(),
            "delivery: grace period over; attempts that have not sent their message give up (retried after the restart), the others wait for the next hop's answer"
        );
        engine.abandon_unsent();
        // An attempt past the final dot ends within one reply timeout.
        let wait = final_reply_wait(&engine);
        if tokio::time::timeout(wait, join_all(&mut tasks))
            .await
            .is_err()
        {
            tracing::error!(
                running = tasks.len(),
                "delivery: attempts still unanswered after the reply timeout; aborting them (those messages may be delivered twice)"
            );
            tasks.abort_all();
        }
    }
    for c in engine.pool.drain() {
        c.quit().await;
    }
    tracing::info!("delivery stopped");
}
