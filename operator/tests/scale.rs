//! Operator scale benchmark (not a test; run with `bench/operator-scale.sh`): N MailClusters of 3
//! members each on kwok nodes, in-process operator. Prints time until all are Ready, reconciles,
//! reconcile duration, write requests until steady, and the writes of a full no-op resync.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use kube::api::{Api, Patch, PatchParams};
use mailcluster_operator::crd::MailCluster;
use mailcluster_operator::status::READY;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run bench/operator-scale.sh"]
async fn scale() {
    let n: usize = std::env::var("MAILCLUSTER_SCALE_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (cp, client) = setup().await;
    let ns = cp.new_namespace("scale").await.unwrap();
    let (op_client, writes) = counting_client(cp).await;
    let op = Operator::start(op_client, &ns, None, "scale");
    let api: Api<MailCluster> = Api::namespaced(client.clone(), &ns);
    let start = Instant::now();
    for i in 0..n {
        create(&api, &manifest(&format!("relay{i}"), &ns))
            .await
            .unwrap();
    }
    let created = start.elapsed();
    let ready_at = std::sync::Arc::new(std::sync::Mutex::new(vec![None; n]));
    eventually(
        cp,
        &ns,
        "all clusters Ready",
        Duration::from_secs(60 + 15 * n as u64),
        || {
            let api = api.clone();
            let ready_at = ready_at.clone();
            async move {
                let list = api.list(&Default::default()).await?;
                let mut ready_at = ready_at.lock().unwrap();
                for mc in list.items {
                    let i: usize = mc.metadata.name.as_deref().unwrap()[5..].parse().unwrap();
                    if ready_at[i].is_none() && condition(&mc, READY).is_some_and(|c| c.0 == "True")
                    {
                        ready_at[i] = Some(start.elapsed());
                    }
                }
                Ok(ready_at.iter().all(Option::is_some))
            }
        },
    )
    .await;
    let all_ready = start.elapsed();
    let mut times: Vec<Duration> = ready_at.lock().unwrap().iter().flatten().copied().collect();
    times.sort();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconciles = op.reconciles();
    let steady_writes = writes.load(Ordering::SeqCst);
    let text = op.ctx.metrics.encode().unwrap();
    let metric = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let mean_ms = 1000.0 * metric("mailcluster_operator_reconcile_duration_seconds_sum")
        / metric("mailcluster_operator_reconcile_duration_seconds_count").max(1.0);

    // A resync of every cluster (poke each) must write nothing.
    let before = op.reconciles();
    let w0 = writes.load(Ordering::SeqCst);
    let poke = Instant::now();
    for i in 0..n {
        api.patch(
            &format!("relay{i}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"poke": "1"}}})),
        )
        .await
        .unwrap();
    }
    eventually(
        cp,
        &ns,
        "a reconcile of every cluster",
        Duration::from_secs(120),
        || async { Ok(op.reconciles() >= before + n as u64) },
    )
    .await;
    let resync = poke.elapsed();
    let noop_writes = writes.load(Ordering::SeqCst) - w0;

    // Peak RSS of this process: the operator and its caches, plus the test's own client.
    let peak_rss_mb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0;
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    println!(
        "operator-scale: clusters={n} members={} created_in={:.2}s all_ready_in={:.2}s \
         ready_p50={:.2}s ready_p99={:.2}s ready_max={:.2}s peak_rss={peak_rss_mb:.1}MB reconciles={reconciles} mean_reconcile={mean_ms:.1}ms \
         writes_until_steady={steady_writes} ({:.1}/cluster) noop_resync_in={:.2}s noop_writes={noop_writes}",
        3 * n,
        created.as_secs_f64(),
        all_ready.as_secs_f64(),
        times[times.len() / 2].as_secs_f64(),
        p99.as_secs_f64(),
        times[times.len() - 1].as_secs_f64(),
        steady_writes as f64 / n as f64,
        resync.as_secs_f64(),
    );
    assert_eq!(noop_writes, 0);
    op.stop().await;
}
