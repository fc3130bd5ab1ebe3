//! Group commit: one syncer thread makes a batch of written messages durable together. For a
//! batch it `fdatasync`s every message file and `fsync`s the `active/` directory once, all in
//! parallel (the files are already in the directory, so the order does not matter and the
//! block layer merges the cache flushes), then marks each durable file complete. Concurrent
//! sessions thus share the directory sync and the flushes instead of paying both each. Unlike
//! `syncfs`, the cost does not depend on unrelated dirty data on the volume.

use std::fs::File;
use std::sync::mpsc;
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Most threads used to sync one batch.
const SYNC_THREADS: usize = 8;

/// Handle to the syncer thread.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<(File, Waiter)>,
}

fn sync_file(f: &File) -> Result<(), String> {
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    super::mark_complete(f).map_err(|e| format!("mark complete: {e}"))
}

/// Sync `files` and `dir` in parallel; a file is marked complete only after its own data is
/// durable, and its result is an error if the directory sync failed.
fn sync_batch(files: &[File], dir: &File) -> Vec<Result<(), String>> {
    let per = files.len().div_ceil(SYNC_THREADS).max(1);
    let mut results: Vec<Result<(), String>> = Vec::with_capacity(files.len());
    let dir_result = std::thread::scope(|s| {
        let dir_sync = s.spawn(|| dir.sync_all().map_err(|e| format!("fsync directory: {e}")));
        let handles: Vec<_> = files
            .chunks(per)
            .map(|chunk| s.spawn(move || chunk.iter().map(sync_file).collect::<Vec<_>>()))
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => results.extend(r),
                Err(_) => results.push(Err("sync thread panicked".into())),
            }
        }
        dir_sync
            .join()
            .unwrap_or_else(|_| Err("sync thread panicked".into()))
    });
    results.resize_with(files.len(), || Err("sync thread panicked".into()));
    match dir_result {
        Ok(()) => results,
        Err(msg) => vec![Err(msg); files.len()],
    }
}

impl GroupCommit {
    /// Start the syncer for the queue directory `dir` (where messages are renamed to).
    pub fn start(
        dir: File,
        fsync_seconds: Histogram,
        batch_size: Histogram,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(File, Waiter)>();
        std::thread::Builder::new()
            .name("queue-syncer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(w) = rx.try_recv() {
                        batch.push(w);
                    }
                    let t = Instant::now();
                    let (files, waiters): (Vec<File>, Vec<Waiter>) = batch.into_iter().unzip();
                    let results = sync_batch(&files, &dir);
                    fsync_seconds.observe(t.elapsed().as_secs_f64());
                    batch_size.observe(files.len() as f64);
                    for (w, r) in waiters.into_iter().zip(results) {
                        let _ = w.send(r);
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Wait until `file` (already in the directory) and its directory entry are durable and
    /// the file is marked complete.
    pub async fn commit(&self, file: File) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((file, tx))
            .map_err(|_| "syncer stopped".to_owned())?;
        rx.await.map_err(|_| "syncer stopped".to_owned())?
    }
}
