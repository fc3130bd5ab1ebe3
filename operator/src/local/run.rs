//! `local` from start to stop: the manifest read, the files made, the sink and the members
//! started, what a person needs printed, and the members stopped on SIGINT/SIGTERM or when one
//! exits by itself.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::builders::BuildError;
use crate::render;

use super::files::{find_mailnode, mkdir, shared_files};
use super::layout::layout;
use super::members::{any_exit, start_all, stop_all};
use super::summary::Summary;
use super::{Adjustments, LocalError, Options, Sink, io, localize};

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// Runs the cluster until SIGINT or SIGTERM.
pub async fn run(opts: Options) -> Result<(), LocalError> {
    let mc = render::read(&opts.manifest, &opts.namespace)?;
    let name = mc.metadata.name.clone().ok_or(BuildError::MissingName)?;
    let mailnode = find_mailnode(opts.mailnode.as_deref())?;
    let state = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".mailcluster-local").join(&name));
    mkdir(&state)?;
    let state = std::fs::canonicalize(&state).map_err(io("cannot resolve", state.display()))?;
    let (files, password) = shared_files(&mc, &state, &mailnode).await?;

    let use_sink = opts.force_sink || mc.spec.delivery.smarthosts.is_empty();
    let sink = if use_sink {
        Some(
            Sink::start(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                state.join("sink"),
            )
            .await?,
        )
    } else {
        None
    };
    let members_layout = layout(&mc, opts.first_ip, &state)?;
    let mut configs = Vec::new();
    let mut adjustments = Adjustments::default();
    for i in 0..members_layout.len() {
        let (c, adj) = localize(
            &mc,
            &members_layout,
            i,
            &files,
            sink.as_ref().map(|s| s.addr),
        )?;
        adjustments = adj;
        configs.push(c);
    }

    println!(
        "mailcluster {name}: {} member(s) of {} on loopback (manifest {}, state {})",
        members_layout.len(),
        mc.spec.hostname,
        opts.manifest.display(),
        state.display()
    );
    println!("  mailnode: {}", mailnode.display());
    let mut members = start_all(&mailnode, &members_layout, &configs).await?;

    let started: Vec<_> = members
        .iter()
        .map(|m| (&m.layout, m.child.id().unwrap_or(0), m.log.as_path()))
        .collect();
    let out = Summary {
        mc: &mc,
        state: &state,
        members: started,
        configs: &configs,
        sink: sink.as_ref().map(|s| (s.addr, s.dir.as_path())),
        adjustments: &adjustments,
        tls: files.tls.is_some(),
        password: password.as_deref(),
    }
    .render();
    print!("{out}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let outcome = tokio::select! {
        sig = shutdown_signal() => Ok(sig),
        (member, status) = any_exit(&mut members) => Err((member, status)),
    };
    match outcome {
        Ok(sig) => {
            println!("{sig}: stopping the members");
            stop_all(&mut members).await;
            println!("stopped");
            let _ = std::io::stdout().flush();
            Ok(())
        }
        Err((member, status)) => {
            println!("member {member} exited ({status}); stopping the others");
            stop_all(&mut members).await;
            let log = members
                .iter()
                .find(|m| m.layout.name == member)
                .map(|m| m.log.display().to_string())
                .unwrap_or_default();
            Err(LocalError::Member {
                member,
                message: format!("exited by itself ({status})"),
                log,
            })
        }
    }
}
