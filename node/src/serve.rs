//! `mailnode serve`: open the queue (recovering it), bind listeners and the admin port, run
//! the background tasks, and shut down gracefully on SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{AuthError, UsersFile};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::queue::{Queue, QueueError, SyncMode};
use crate::smtp_server::{ListenerCtx, run_listener};
use crate::state::Node;
use crate::tls::{ReloadingCert, TlsError, server_config};

/// Start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Queue.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// TLS.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// Users file.
    #[error("auth: {0}")]
    Auth(#[from] AuthError),
    /// Bind failed.
    #[error("cannot listen on {address} ({name}): {source}")]
    Bind {
        /// Listener name.
        name: String,
        address: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Delivery engine.
    #[error("delivery: {0}")]
    Delivery(#[from] crate::delivery::attempt::EngineError),
    /// Signal handler.
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

fn storage_ok(node: &Node) -> bool {
    match node.queue.free_space() {
        Ok((avail, pct)) => {
            avail >= node.config.queue.min_free_bytes
                && pct >= f64::from(node.config.queue.min_free_percent)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check queue disk space");
            true
        }
    }
}

/// Run the node until SIGTERM/SIGINT, then drain and return. The config hash shown in
/// `/status` is that of the config rendered as YAML; [`serve_with`] takes the file's.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let yaml = config.to_yaml().unwrap_or_default();
    serve_with(config, &crate::peer::sha256_hex(yaml.as_bytes()), None).await
}

/// Run the node; `config_hash` is the SHA-256 (hex) of the config file's bytes. With the
/// file's path, changes of the file are applied while running ([`crate::reload`]).
pub async fn serve_with(
    config: Config,
    config_hash: &str,
    config_path: Option<std::path::PathBuf>,
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    let q = &config.queue;
    let mode = match (q.fsync, q.group_commit, q.sync_filesystem) {
        (false, _, _) => SyncMode::None,
        (true, false, _) => SyncMode::PerMessage,
        (true, true, false) => SyncMode::Group,
        (true, true, true) => SyncMode::GroupFilesystem,
    };
    let (queue, rec) = Queue::open(
        &config.queue.path,
        mode,
        metrics.fsync_seconds.clone(),
        metrics.commit_batch.clone(),
    )?;
    tracing::info!(path = %config.queue.path.display(), kept = rec.kept, removed_partial = rec.removed, removed_tmp = rec.tmp_removed, other_version = rec.other_version, mode = ?mode, "queue recovered");

    let (cert, tls) = match &config.tls {
        Some(files) => {
            let cert = Arc::new(ReloadingCert::load(&files.cert_file, &files.key_file)?);
            let acceptor = server_config(Arc::clone(&cert))?;
            (Some(cert), Some(acceptor))
        }
        None => (None, None),
    };
    let users = match &config.auth {
        Some(a) => {
            let u = UsersFile::load(&a.users_file)?;
            tracing::info!(users = u.users().len(), "auth users loaded");
            Some(Arc::new(u))
        }
        None => None,
    };
    let (shutdown, _) = watch::channel(false);
    let (delivery, delivery_rx) = crate::delivery::Handle::channel();
    let node = Arc::new(Node {
        config: config.clone(),
        queue: Arc::new(queue),
        metrics,
        cert,
        tls,
        users,
        draining: AtomicBool::new(false),
        storage_ok: AtomicBool::new(true),
        active: AtomicUsize::new(0),
        client_slots: crate::admission::ClientSlots::new(config.limits.max_sessions_per_client),
        budget: crate::admission::MemoryBudget::new(config.limits.max_in_flight_bytes),
        auth_limiter: crate::auth_limit::AuthLimiter::new(
            crate::auth_limit::AuthLimits::from_config(&config.limits),
        ),
        tls_handshakes: Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_tls_handshakes,
        )),
        shutdown,
        delivery: delivery.clone(),
        peers: (config.peers.address.is_some() || !config.peers.members.is_empty())
            .then(|| Arc::new(crate::peer::Peers::new(&config))),
        peer_counts: Arc::new(crate::rate_limit::PeerCounts::new()),
        drain_requested: tokio::sync::Notify::new(),
        drained: AtomicBool::new(false),
        loaded: std::sync::RwLock::new(crate::state::LoadedConfig {
            hash: config_hash.to_owned(),
            at: jiff::Timestamp::now().to_string(),
            error: None,
            restart_needed: false,
        }),
    });
    let engine = Arc::new(crate::delivery::attempt::Engine::new(
        config.clone(),
        Arc::clone(&node.queue),
        Arc::clone(&node.metrics),
        delivery,
    )?);
    let final_reply_wait = crate::delivery::scheduler::final_reply_wait(&engine);
    let scheduler = tokio::spawn(crate::delivery::scheduler::run(
        Arc::clone(&engine),
        delivery_rx,
        node.shutdown.subscribe(),
        Duration::from_secs(config.limits.shutdown_grace_seconds),
    ));
    tokio::spawn(crate::tls_report::send::run(
        Arc::clone(&engine),
        node.shutdown.subscribe(),
    ));
    node.storage_ok.store(storage_ok(&node), Ordering::Relaxed);

    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let sock = TcpListener::bind(l.address)
            .await
            .map_err(|source| ServeError::Bind {
                name: l.name.clone(),
                address: l.address,
                source,
            })?;
        tracing::info!(listener = %l.name, address = %sock.local_addr().unwrap_or(l.address), "listening");
        let ctx = Arc::new(ListenerCtx::new(
            &config,
            l,
            node.tls.is_some(),
            Arc::clone(&node.budget),
            node.peers.is_some().then(|| Arc::clone(&node.peer_counts)),
        ));
        listeners.push(Arc::clone(&ctx));
        tokio::spawn(run_listener(Arc::clone(&node), ctx, sock));
    }
    if let Some(peers) = &node.peers
        && config.peers.secret_file.is_some()
    {
        tokio::spawn(crate::peer::share_rate_counts(
            Arc::clone(peers),
            Arc::clone(&node.metrics),
            listeners.clone(),
        ));
    }
    if let Some(path) = config_path
        && config.reload_interval_seconds > 0
    {
        let mut reloader = crate::reload::Reloader::new(
            path,
            &config,
            Arc::clone(&node),
            Arc::clone(&engine),
            listeners,
        );
        let every = Duration::from_secs(config.reload_interval_seconds);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                // Reading and parsing a small file; the blocking pool is not worth it.
                let _ = reloader.check();
            }
        });
    }
    if let (Some(addr), Some(peers)) = (config.peers.address, &node.peers) {
        if config.peers.secret_file.is_none() {
            tracing::warn!(
                "peers.address is set but peers.secretFile is not: peer channel disabled"
            );
        } else {
            let sock = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    name: "peers".into(),
                    address: addr,
                    source,
                })?;
            tracing::info!(address = %sock.local_addr().unwrap_or(addr), instance = %peers.instance, "peer channel listening");
            let ctx = Arc::new(crate::peer::ServerCtx {
                node: Arc::clone(&node),
                peers: Arc::clone(peers),
                max_size: config.limits.max_message_size.saturating_mul(2) + (1 << 20),
            });
            tokio::spawn(crate::peer::run_listener(ctx, sock));
        }
        let peers = Arc::clone(peers);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                peers.probe().await;
            }
        });
    }
    let admin = TcpListener::bind(config.admin.address)
        .await
        .map_err(|source| ServeError::Bind {
            name: "admin".into(),
            address: config.admin.address,
            source,
        })?;
    tracing::info!(address = %admin.local_addr().unwrap_or(config.admin.address), "admin listening");
    {
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(node, admin).await {
                tracing::error!(error = %e, "admin server failed");
            }
        });
    }
    // Background: disk space, queue rescan, TLS and users reload.
    {
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                let ok = storage_ok(&node);
                if ok != node.storage_ok.swap(ok, Ordering::Relaxed) {
                    tracing::warn!(storage_ok = ok, "queue disk space state changed");
                }
                if n.is_multiple_of(30)
                    && let Err(e) = node.queue.rescan()
                {
                    tracing::warn!(error = %e, "queue rescan failed");
                }
            }
        });
    }
    if node.cert.is_some() || node.users.is_some() {
        let node = Arc::clone(&node);
        let secs = config
            .tls
            .as_ref()
            .map_or(10, |t| t.reload_interval_seconds.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(secs));
            loop {
                tick.tick().await;
                if let Some(c) = &node.cert {
                    match c.refresh() {
                        Ok(true) => tracing::info!("TLS certificate reloaded"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "TLS certificate reload failed; keeping the old one")
                        }
                    }
                }
                if let Some(u) = &node.users {
                    match u.refresh() {
                        Ok(true) => tracing::info!(users = u.users().len(), "auth users reloaded"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "users file reload failed; keeping the old one")
                        }
                    }
                }
            }
        });
    }
    tracing::info!(hostname = %config.hostname, "mailnode ready");

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    let by_request = tokio::select! {
        _ = term.recv() => false,
        _ = int.recv() => false,
        () = node.drain_requested.notified() => true,
    };
    let delay = Duration::from_secs(config.limits.shutdown_delay_seconds);
    if !by_request && !delay.is_zero() {
        // Still ready and accepting: a terminating pod's endpoint is already not ready, so
        // load balancers and kube-proxy stop sending it new connections, while those already
        // on their way (kube-proxy uses a terminating endpoint that still serves when its node
        // has no other) are served, not refused, and none reaches a pod that is gone.
        tracing::info!(
            delay_seconds = delay.as_secs(),
            "shutdown requested: accepting mail until the delay is over, then draining"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {},
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
    tracing::info!(
        sessions = node.active.load(Ordering::SeqCst),
        by_request,
        "shutdown requested: draining"
    );
    node.draining.store(true, Ordering::SeqCst);
    node.metrics.draining.set(1);
    let _ = node.shutdown.send(true);
    let grace = Duration::from_secs(config.limits.shutdown_grace_seconds);
    let until = tokio::time::Instant::now() + grace;
    while node.active.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = node.active.load(Ordering::SeqCst);
    if left > 0 {
        tracing::warn!(
            sessions = left,
            "grace period over, closing remaining sessions"
        );
    }
    match tokio::time::timeout(grace + final_reply_wait + Duration::from_secs(2), scheduler).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "delivery scheduler failed"),
        Err(_) => tracing::warn!("delivery scheduler did not stop in time"),
    }
    // Hand the queue to the other members (delivery has stopped, so nothing is in flight).
    if let Some(peers) = node.peers.clone() {
        let mut round = 0u32;
        loop {
            round += 1;
            match peers.hand_off(&node.queue).await {
                Ok((moved, 0)) => {
                    tracing::info!(moved, "queue handed off to peers; queue empty");
                    break;
                }
                Ok((moved, left)) => {
                    tracing::warn!(moved, left, round, "queue hand-off incomplete")
                }
                Err(e) => tracing::warn!(error = %e, round, "queue hand-off failed"),
            }
            // On SIGTERM try a few times (the messages stay on the volume otherwise); on a
            // drain request keep trying until SIGTERM.
            if !by_request && round >= 3 {
                tracing::warn!("giving up the hand-off; messages stay in the queue directory");
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {},
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        let _ = node.queue.rescan();
    }
    node.drained.store(true, Ordering::SeqCst);
    if by_request {
        tracing::info!("drained; not accepting mail; waiting for SIGTERM");
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
    tracing::info!("mailnode stopped");
    Ok(())
}
