//! Group commit: one syncer task makes a batch of written messages durable together. For a
//! batch it `fdatasync`s every message file and `fsync`s the `active/` directory once, all in
//! parallel on the blocking pool (the files are already in the directory, so the order does
//! not matter, and the block layer merges the cache flushes), then marks each durable file
//! complete. Concurrent sessions thus share the directory sync and the flushes instead of
//! paying both each; the cost does not depend on unrelated dirty data on the volume.
//!
//! With `whole_fs` (the queue has a file system of its own), a batch is instead made durable
//! by one `syncfs(2)`: the kernel writes the batch's data, inodes and directory blocks in one
//! writeback and flushes the disk once, where per-file syncs write each file's inode block
//! (shared by neighbouring inodes) once per file, one after the other.

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), String>>;

/// Most blocking-pool threads used to sync one batch's files.
const SYNC_THREADS: usize = 8;

/// Handle to the syncer task.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<(File, Waiter)>,
}

fn mark(f: &File) -> Result<(), String> {
    super::mark_complete(f).map_err(|e| format!("mark complete: {e}"))
}

fn sync_file(f: &File) -> Result<(), String> {
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    mark(f)
}

/// Run `f` on the blocking pool (it starts now, not when awaited); a failed task is an error
/// like the others.
fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> impl Future<Output = Result<T, String>> {
    let task = tokio::task::spawn_blocking(f);
    async move { task.await.map_err(|e| format!("sync task failed: {e}"))? }
}

/// Make the whole file system of `dir` durable, then mark every file complete.
async fn sync_filesystem(files: Vec<File>, dir: Arc<File>) -> Vec<Result<(), String>> {
    let n = files.len();
    let synced = blocking(move || {
        rustix::fs::syncfs(&*dir).map_err(|e| format!("syncfs: {e}"))?;
        Ok(files.iter().map(mark).collect::<Vec<_>>())
    });
    synced.await.unwrap_or_else(|msg| vec![Err(msg); n])
}

/// Sync `files` and `dir` in parallel; a file is marked complete only after its own data is
/// durable, and its result is an error if the directory sync failed.
async fn sync_batch(files: Vec<File>, dir: Arc<File>) -> Vec<Result<(), String>> {
    let n = files.len();
    let per = n.div_ceil(SYNC_THREADS).max(1);
    // Every sync starts on the blocking pool before any is awaited, so they all run at once.
    let dir_sync = blocking(move || dir.sync_all().map_err(|e| format!("fsync directory: {e}")));
    let mut chunks = Vec::new();
    let mut files = files.into_iter().peekable();
    while files.peek().is_some() {
        let chunk: Vec<File> = files.by_ref().take(per).collect();
        let len = chunk.len();
        let synced = blocking(move || Ok(chunk.iter().map(sync_file).collect::<Vec<_>>()));
        chunks.push((len, synced));
    }
    let mut results = Vec::with_capacity(n);
    for (len, task) in chunks {
        match task.await {
            Ok(r) => results.extend(r),
            Err(msg) => results.extend(vec![Err(msg); len]),
        }
    }
    match dir_sync.await {
        Ok(()) => results,
        Err(msg) => vec![Err(msg); n],
    }
}

impl GroupCommit {
    /// Start the syncer for the queue directory `dir` (where messages are written). Needs a
    /// tokio runtime.
    pub fn start(
        dir: File,
        whole_fs: bool,
        fsync_seconds: Histogram,
        batch_size: Histogram,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(File, Waiter)>();
        let dir = Arc::new(dir);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(w) = rx.try_recv() {
                    batch.push(w);
                }
                let t = Instant::now();
                let (files, waiters): (Vec<File>, Vec<Waiter>) = batch.into_iter().unzip();
                batch_size.observe(files.len() as f64);
                let results = if whole_fs {
                    sync_filesystem(files, Arc::clone(&dir)).await
                } else {
                    sync_batch(files, Arc::clone(&dir)).await
                };
                fsync_seconds.observe(t.elapsed().as_secs_f64());
                for (w, r) in waiters.into_iter().zip(results) {
                    let _ = w.send(r);
                }
            }
        });
        Self { tx }
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
