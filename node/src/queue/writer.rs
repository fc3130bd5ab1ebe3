//! The writer lane: one thread that creates and writes every new message file.
//!
//! Creating a file takes the directory's lock and allocates an inode. When many sessions do it
//! at once from the blocking pool, the kernel spins on that lock (seen as `rwsem_spin_on_owner`
//! in profiles at 50 sessions) and burns the CPU the sessions need. One thread doing the
//! writes in turn never contends, and a 10 KiB write to the page cache takes tens of
//! microseconds, so the lane is far from the limit; the slow part, making the files durable,
//! stays shared and parallel in [`super::commit`].

use std::sync::mpsc;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Handle to the writer thread.
#[derive(Debug, Clone)]
pub struct WriterLane {
    tx: mpsc::Sender<Job>,
}

/// The writer thread has stopped (it only does if a job panicked).
#[derive(Debug, thiserror::Error)]
#[error("the queue writer thread stopped")]
pub struct LaneStopped;

impl WriterLane {
    /// Start the thread.
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Self { tx })
    }

    /// Run `f` on the writer thread and wait for its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, LaneStopped>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = done.send(f());
            }))
            .map_err(|_| LaneStopped)?;
        result.await.map_err(|_| LaneStopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_one_thread() {
        let lane = WriterLane::start().unwrap();
        let mut names = Vec::new();
        for i in 0..5 {
            let (n, name) = lane
                .run(move || (i, std::thread::current().name().map(str::to_owned)))
                .await
                .unwrap();
            assert_eq!(n, i);
            names.push(name);
        }
        names.dedup();
        assert_eq!(names, vec![Some("queue-writer".to_owned())]);
    }
}
