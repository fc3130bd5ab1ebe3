//! The durable queue on a directory (the pod's volume).
//!
//! Layout under the queue path:
//! - `tmp/`: delivery-state files being written; emptied at start-up.
//! - `active/ID`: messages waiting for delivery ([`format`]).
//! - `hold/ID`: messages put on hold by an operator.
//! - `state/ID.json`: delivery progress ([`DeliveryState`]), written by the delivery engine.
//!
//! A message file is created in `active/` under its final name by the writer thread
//! ([`writer`]) with mode 0600, made durable (its data and the directory entry) and only then
//! marked complete by setting the owner's execute bit (mode 0700, as Postfix marks its queue
//! files); the 250 follows. Files without the mark are being written: listings and the delivery
//! engine skip them. Durability is either `fdatasync` of the file and `fsync` of `active/` per
//! message, or (group commit) one batch of parallel `fdatasync`s plus one directory `fsync`,
//! shared by every message written meanwhile ([`commit`]). Each file carries lengths and a
//! SHA-256, so start-up recovery keeps complete files (making unmarked ones durable and marking
//! them) and removes partial ones, which can only be messages that never got their 250.

pub mod commit;
pub mod format;
pub mod message_file;
pub mod writer;

use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;

pub use format::{DeliveryState, Envelope, RecipientState, RecipientStatus};
pub use message_file::MessageFile;

use commit::GroupCommit;
use writer::WriterLane;

/// Mode of a message file being written.
const WRITING_MODE: u32 = 0o600;
/// Mode of a complete, durable message file: the owner's execute bit is the mark.
const COMPLETE_MODE: u32 = 0o700;

fn is_complete(mode: u32) -> bool {
    mode & 0o100 != 0
}

/// Mark a durable message file complete.
pub(crate) fn mark_complete(file: &File) -> std::io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(COMPLETE_MODE))
}

/// Queue errors, with the path involved.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// File system error.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// No such message.
    #[error("no message {0} in the queue")]
    NotFound(String),
    /// Invalid file.
    #[error("message {id}: {source}")]
    Format {
        id: String,
        /// Cause.
        source: format::FormatError,
    },
    /// Envelope could not be encoded.
    #[error("encoding envelope: {0}")]
    Encode(#[from] serde_json::Error),
    /// The durability step failed.
    #[error("commit failed: {0}")]
    Commit(String),
    /// A blocking task failed.
    #[error("background task failed: {0}")]
    Task(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> QueueError + 'a {
    move |source| QueueError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Where a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Waiting for delivery.
    Active,
    /// On hold.
    Hold,
}

impl Location {
    fn dir(self) -> &'static str {
        match self {
            Location::Active => "active",
            Location::Hold => "hold",
        }
    }

    /// Name for listings.
    pub fn as_str(self) -> &'static str {
        self.dir()
    }
}

/// One row of `queue list`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub location: Location,
    pub file_size: u64,
}

/// Result of start-up recovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Complete messages kept.
    pub kept: u64,
    /// Partial or corrupt messages removed.
    pub removed: u64,
    /// Leftover temporary files removed.
    pub tmp_removed: u64,
    /// Bytes of kept messages.
    pub bytes: u64,
    /// Kept messages written by another mailnode version (see [`format::ENVELOPE_VERSION`]).
    pub other_version: u64,
}

/// How the queue makes messages durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// No fsync (tests only).
    None,
    /// fdatasync the file and fsync the directory for each message.
    PerMessage,
    /// One syncer batch (parallel fdatasync, one directory fsync) for concurrent messages.
    Group,
    /// One syncer batch made durable by one `syncfs` of the queue's file system.
    GroupFilesystem,
}

/// The queue.
#[derive(Debug)]
pub struct Queue {
    root: PathBuf,
    mode: SyncMode,
    writer: WriterLane,
    group: Option<GroupCommit>,
    fsync_seconds: Histogram,
    seq: AtomicU64,
    depth: AtomicI64,
    bytes: AtomicI64,
}

fn fsync_dir(path: &Path) -> Result<(), QueueError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", path))
}

fn is_id(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Queue {
    /// Open (creating directories) without recovery or a syncer: for the CLI.
    pub fn open_dir(root: &Path) -> Result<Self, QueueError> {
        for d in ["tmp", "active", "hold", "state"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io("create directory", &p))?;
        }
        Ok(Self {
            root: root.to_owned(),
            mode: SyncMode::PerMessage,
            writer: WriterLane::start().map_err(io("start writer thread", root))?,
            group: None,
            fsync_seconds: Histogram::new([0.001]),
            seq: AtomicU64::new(0),
            depth: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
        })
    }

    /// Open for serving: recover, then start the syncer if `mode` is [`SyncMode::Group`].
    pub fn open(
        root: &Path,
        mode: SyncMode,
        fsync_seconds: Histogram,
        batch_size: Histogram,
    ) -> Result<(Self, Recovery), QueueError> {
        let mut q = Self::open_dir(root)?;
        q.mode = mode;
        q.fsync_seconds = fsync_seconds.clone();
        let rec = q.recover()?;
        q.depth.store(
            i64::try_from(rec.kept).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        q.bytes.store(
            i64::try_from(rec.bytes).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        if matches!(mode, SyncMode::Group | SyncMode::GroupFilesystem) {
            let active = root.join("active");
            let dir = File::open(&active).map_err(io("open", &active))?;
            let whole_fs = mode == SyncMode::GroupFilesystem;
            q.group = Some(GroupCommit::start(dir, whole_fs, fsync_seconds, batch_size));
        }
        Ok((q, rec))
    }

    /// Queue root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Messages in the queue (as counted by this process).
    pub fn depth(&self) -> i64 {
        self.depth.load(Ordering::Relaxed)
    }

    /// Bytes in the queue (as counted by this process).
    pub fn bytes(&self) -> i64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A new, unique, time-ordered id.
    pub fn new_id(&self) -> String {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF;
        format!("{micros:014X}{seq:05X}")
    }

    /// Remove temporary files and invalid messages; count the rest.
    pub fn recover(&self) -> Result<Recovery, QueueError> {
        let mut rec = Recovery::default();
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io("read directory", &tmp))? {
            let e = e.map_err(io("read directory", &tmp))?;
            fs::remove_file(e.path()).map_err(io("remove", &e.path()))?;
            rec.tmp_removed += 1;
        }
        for loc in [Location::Active, Location::Hold] {
            let dir = self.root.join(loc.dir());
            let mut changed = false;
            for e in fs::read_dir(&dir).map_err(io("read directory", &dir))? {
                let e = e.map_err(io("read directory", &dir))?;
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let valid = is_id(&name)
                    && match fs::read(&path) {
                        Ok(bytes) => match format::decode(&bytes) {
                            Ok(_) => {
                                rec.bytes += bytes.len() as u64;
                                self.complete_recovered(&path)?;
                                true
                            }
                            // Complete (its checksum holds) but from another version: kept,
                            // never removed as if it were partial.
                            Err(err @ format::FormatError::Version { .. }) => {
                                tracing::error!(id = %name, error = %err, "keeping a queued message this version cannot deliver");
                                rec.bytes += bytes.len() as u64;
                                rec.other_version += 1;
                                self.complete_recovered(&path)?;
                                true
                            }
                            Err(err) => {
                                tracing::warn!(id = %name, error = %err, "removing partial message from queue");
                                false
                            }
                        },
                        Err(err) => {
                            tracing::warn!(id = %name, error = %err, "removing unreadable queue file");
                            false
                        }
                    };
                if valid {
                    rec.kept += 1;
                } else {
                    fs::remove_file(&path).map_err(io("remove", &path))?;
                    let _ = fs::remove_file(self.state_path(&name));
                    rec.removed += 1;
                    changed = true;
                }
            }
            if changed {
                fsync_dir(&dir)?;
            }
        }
        if rec.tmp_removed > 0 {
            fsync_dir(&tmp)?;
        }
        Ok(rec)
    }

    /// A whole message file found at start-up without the complete mark was written but maybe
    /// not made durable before the process stopped: make it durable now, then mark it.
    fn complete_recovered(&self, path: &Path) -> Result<(), QueueError> {
        let meta = fs::metadata(path).map_err(io("stat", path))?;
        if is_complete(meta.permissions().mode()) {
            return Ok(());
        }
        let f = File::open(path).map_err(io("open", path))?;
        f.sync_data().map_err(io("fdatasync", path))?;
        mark_complete(&f).map_err(io("mark complete", path))?;
        if let Some(dir) = path.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    fn state_path(&self, id: &str) -> PathBuf {
        self.root.join("state").join(format!("{id}.json"))
    }

    /// Write a message durably. Returns when it is safe to answer 250. On an error the
    /// caller removes the file ([`Queue::discard`]).
    pub async fn enqueue(
        self: &Arc<Self>,
        env: Envelope,
        header: Vec<u8>,
        body: Vec<u8>,
    ) -> Result<(), QueueError> {
        // The checksum and envelope are made here, on the session's thread, so that the
        // writer thread only creates and writes the file.
        let trailer = format::trailer(&env, &[&header, &body])?;
        let active = self.root.join("active");
        let written = self
            .writer
            .run(move || MessageFile::create(&active, &env.id)?.close(&[&header, &body, &trailer]))
            .await
            .map_err(|e| QueueError::Task(e.to_string()))??;
        self.make_durable(written).await
    }

    /// Start the file of message `id` whose content is still arriving, with its first bytes
    /// (the Received header and the content so far): the writer thread only creates it, and
    /// the bytes are written as by [`Queue::append_to`]. More follow with
    /// [`Queue::append_to`], and [`Queue::enqueue_file`] finishes it.
    pub async fn start_file(
        &self,
        id: String,
        first: [Vec<u8>; 2],
    ) -> Result<MessageFile, QueueError> {
        let active = self.root.join("active");
        let file = self
            .writer
            .run(move || MessageFile::create(&active, &id))
            .await
            .map_err(|e| QueueError::Task(e.to_string()))??;
        Self::append_parts(file, first).await
    }

    /// Append content to a started message file (on the blocking pool).
    pub async fn append_to(
        &self,
        file: MessageFile,
        bytes: Vec<u8>,
    ) -> Result<MessageFile, QueueError> {
        Self::append_parts(file, [bytes]).await
    }

    async fn append_parts<const N: usize>(
        mut file: MessageFile,
        parts: [Vec<u8>; N],
    ) -> Result<MessageFile, QueueError> {
        tokio::task::spawn_blocking(move || {
            let slices: [&[u8]; N] = std::array::from_fn(|i| parts[i].as_slice());
            file.append(&slices).map(|()| file)
        })
        .await
        .map_err(|e| QueueError::Task(e.to_string()))?
    }

    /// Finish a started message file with the content's last bytes and the envelope, and make
    /// it durable, as [`Queue::enqueue`]. On an error the caller removes the file
    /// ([`Queue::discard`]).
    pub async fn enqueue_file(
        self: &Arc<Self>,
        file: MessageFile,
        env: Envelope,
        tail: Vec<u8>,
    ) -> Result<(), QueueError> {
        let written = tokio::task::spawn_blocking(move || file.finish(&env, &[&tail]))
            .await
            .map_err(|e| QueueError::Task(e.to_string()))??;
        self.make_durable(written).await
    }

    /// The durability step for a written file (by `mode`), then the counts.
    async fn make_durable(self: &Arc<Self>, (size, file): (u64, File)) -> Result<(), QueueError> {
        match (&self.group, self.mode) {
            (Some(g), _) => g.commit(file).await.map_err(QueueError::Commit)?,
            (None, SyncMode::PerMessage) => {
                let me = Arc::clone(self);
                tokio::task::spawn_blocking(move || me.sync_one(&file))
                    .await
                    .map_err(|e| QueueError::Task(e.to_string()))??
            }
            (None, _) => mark_complete(&file).map_err(io("mark complete", &self.root))?,
        }
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(i64::try_from(size).unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }

    /// Per-message durability: the file's data, the directory entry, then the mark.
    fn sync_one(&self, file: &File) -> Result<(), QueueError> {
        let active = self.root.join("active");
        let t = Instant::now();
        file.sync_data().map_err(io("fdatasync", &active))?;
        fsync_dir(&active)?;
        self.fsync_seconds.observe(t.elapsed().as_secs_f64());
        mark_complete(file).map_err(io("mark complete", &active))
    }

    /// Take a message moved from a peer: its delivery state is written first, then the
    /// message (durably, as [`Queue::enqueue`]). Keeps the peer's id unless this queue already
    /// has that id; the same message sent again (a hand-off retried after a crash) is
    /// recognized and not queued twice. Returns (id, duplicate).
    pub async fn import(
        self: Arc<Self>,
        mut env: Envelope,
        state: DeliveryState,
        msg: Vec<u8>,
        hold: bool,
    ) -> Result<(String, bool), QueueError> {
        if !is_id(&env.id) {
            env.id = self.new_id();
        }
        if let Ok((_, path)) = self.locate(&env.id) {
            let same = fs::read(&path).ok().is_some_and(|bytes| {
                format::decode(&bytes).is_ok_and(|(e, range)| e == env && bytes[range] == msg[..])
            });
            if same {
                return Ok((env.id, true));
            }
            env.id = self.new_id();
        }
        let id = env.id.clone();
        let me = Arc::clone(&self);
        let (sid, st) = (id.clone(), state);
        tokio::task::spawn_blocking(move || me.write_state(&sid, &st))
            .await
            .map_err(|e| QueueError::Task(e.to_string()))??;
        if let Err(e) = self.enqueue(env, msg, Vec::new()).await {
            self.discard(&id);
            let _ = fs::remove_file(self.state_path(&id));
            return Err(e);
        }
        if hold {
            let me = Arc::clone(&self);
            let hid = id.clone();
            tokio::task::spawn_blocking(move || me.hold(&hid))
                .await
                .map_err(|e| QueueError::Task(e.to_string()))??;
        }
        Ok((id, false))
    }

    /// Age in seconds of the oldest message (by receive time), 0 when empty.
    pub fn oldest_age_seconds(&self) -> i64 {
        let now = jiff::Timestamp::now().as_second();
        let Ok(list) = self.list() else { return 0 };
        // Ids are time ordered per node, but messages moved from peers keep their ids: read
        // the envelopes.
        list.iter()
            .filter_map(|e| self.read_envelope(&e.id))
            .map(|env| (now - env.received_at).max(0))
            .max()
            .unwrap_or(0)
    }

    fn read_envelope(&self, id: &str) -> Option<Envelope> {
        let (_, path) = self.locate(id).ok()?;
        let bytes = fs::read(path).ok()?;
        format::decode(&bytes).ok().map(|(e, _)| e)
    }

    /// Forget a message whose commit failed (best effort).
    pub fn discard(&self, id: &str) {
        let _ = fs::remove_file(self.root.join("active").join(id));
    }

    /// List messages.
    pub fn list(&self) -> Result<Vec<Entry>, QueueError> {
        let mut out = Vec::new();
        for loc in [Location::Active, Location::Hold] {
            let dir = self.root.join(loc.dir());
            for e in fs::read_dir(&dir).map_err(io("read directory", &dir))? {
                let e = e.map_err(io("read directory", &dir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !is_id(&name) {
                    continue;
                }
                let Ok(meta) = e.metadata() else { continue };
                if !is_complete(meta.permissions().mode()) {
                    continue; // being written
                }
                let file_size = meta.len();
                out.push(Entry {
                    id: name,
                    location: loc,
                    file_size,
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn locate(&self, id: &str) -> Result<(Location, PathBuf), QueueError> {
        if !is_id(id) {
            return Err(QueueError::NotFound(id.to_owned()));
        }
        for loc in [Location::Active, Location::Hold] {
            let p = self.root.join(loc.dir()).join(id);
            if p.exists() {
                return Ok((loc, p));
            }
        }
        Err(QueueError::NotFound(id.to_owned()))
    }

    /// Read and verify a message: envelope, delivery state, message bytes, location.
    pub fn read(
        &self,
        id: &str,
    ) -> Result<(Envelope, DeliveryState, Vec<u8>, Location), QueueError> {
        let (loc, path) = self.locate(id)?;
        let bytes = fs::read(&path).map_err(io("read", &path))?;
        let (env, range) = format::decode(&bytes).map_err(|source| QueueError::Format {
            id: id.to_owned(),
            source,
        })?;
        let state = self.read_state(&env)?;
        Ok((env, state, bytes[range].to_vec(), loc))
    }

    /// Delivery state (initial if none was written yet).
    pub fn read_state(&self, env: &Envelope) -> Result<DeliveryState, QueueError> {
        let p = self.state_path(&env.id);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(QueueError::Encode),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DeliveryState::initial(env)),
            Err(e) => Err(io("read", &p)(e)),
        }
    }

    /// Write the delivery state atomically and durably.
    pub fn write_state(&self, id: &str, state: &DeliveryState) -> Result<(), QueueError> {
        let p = self.state_path(id);
        let tmp = self.root.join("tmp").join(format!("{id}.state"));
        let data = serde_json::to_vec_pretty(state)?;
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&data).map_err(io("write", &tmp))?;
        f.sync_data().map_err(io("fdatasync", &tmp))?;
        fs::rename(&tmp, &p).map_err(io("rename", &p))?;
        fsync_dir(&self.root.join("state"))
    }

    /// Delete a message and its state, durably (the `queue delete` command).
    pub fn delete(&self, id: &str) -> Result<(), QueueError> {
        let loc = self.remove(id)?;
        fsync_dir(&self.root.join(loc.dir()))
    }

    /// Remove a message whose every recipient is done. The directory is not synced: the
    /// removal reaches the disk with the next sync or writeback, and a crash of the machine
    /// before that only delivers the message again (at least once), while a process exit,
    /// clean or not, loses nothing of the page cache. Postfix does the same.
    pub fn remove_done(&self, id: &str) -> Result<(), QueueError> {
        self.remove(id).map(|_| ())
    }

    fn remove(&self, id: &str) -> Result<Location, QueueError> {
        let (loc, path) = self.locate(id)?;
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(&path).map_err(io("remove", &path))?;
        let _ = fs::remove_file(self.state_path(id));
        self.depth.fetch_sub(1, Ordering::Relaxed);
        self.bytes
            .fetch_sub(i64::try_from(size).unwrap_or(0), Ordering::Relaxed);
        Ok(loc)
    }

    fn move_to(&self, id: &str, to: Location) -> Result<bool, QueueError> {
        let (loc, path) = self.locate(id)?;
        if loc == to {
            return Ok(false);
        }
        let dst = self.root.join(to.dir()).join(id);
        fs::rename(&path, &dst).map_err(io("rename", &dst))?;
        fsync_dir(&self.root.join(to.dir()))?;
        fsync_dir(&self.root.join(loc.dir()))?;
        Ok(true)
    }

    /// Put a message on hold. Returns false if it already was.
    pub fn hold(&self, id: &str) -> Result<bool, QueueError> {
        self.move_to(id, Location::Hold)
    }

    /// Release a held message. Returns false if it was not held.
    pub fn release(&self, id: &str) -> Result<bool, QueueError> {
        self.move_to(id, Location::Active)
    }

    /// Rescan the directories to correct depth and bytes (other processes may change them).
    pub fn rescan(&self) -> Result<(), QueueError> {
        let list = self.list()?;
        self.depth.store(list.len() as i64, Ordering::Relaxed);
        self.bytes.store(
            list.iter().map(|e| e.file_size as i64).sum(),
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Free space of the queue's file system: (available bytes, percent available).
    pub fn free_space(&self) -> Result<(u64, f64), QueueError> {
        let st = rustix::fs::statvfs(&self.root).map_err(|e| QueueError::Io {
            op: "statvfs",
            path: self.root.clone(),
            source: e.into(),
        })?;
        let avail = st.f_bavail.saturating_mul(st.f_frsize);
        let total = st.f_blocks.saturating_mul(st.f_frsize).max(1);
        Ok((avail, avail as f64 * 100.0 / total as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str) -> Envelope {
        let mut e = format::Envelope {
            version: format::ENVELOPE_VERSION,
            id: id.into(),
            sender: "a@b.example".into(),
            recipients: vec!["c@d.example".into(), "e@d.example".into()],
            client: "127.0.0.2:1".parse().unwrap(),
            proxy: None,
            helo: "h".into(),
            auth_user: None,
            listener: "l".into(),
            tls: false,
            smtputf8: false,
            eight_bit: false,
            received_at: 0,
            size: 0,
            attempts: 0,
        };
        e.size = 10;
        e
    }

    #[tokio::test]
    async fn enqueue_list_hold_release_delete_and_recover() {
        for mode in [
            SyncMode::PerMessage,
            SyncMode::Group,
            SyncMode::GroupFilesystem,
            SyncMode::None,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (q, rec) = Queue::open(
                dir.path(),
                mode,
                Histogram::new([0.1]),
                Histogram::new([1.0]),
            )
            .unwrap();
            assert_eq!(rec, Recovery::default());
            let q = Arc::new(q);
            let id = q.new_id();
            q.enqueue(env(&id), b"Received: x\r\n".to_vec(), b"body\r\n".to_vec())
                .await
                .unwrap();
            assert_eq!(q.depth(), 1);
            let (e, st, msg, loc) = q.read(&id).unwrap();
            assert_eq!(e.id, id);
            assert_eq!(st.recipients.len(), 2);
            assert_eq!(msg, b"Received: x\r\nbody\r\n");
            assert_eq!(loc, Location::Active);
            assert!(q.hold(&id).unwrap());
            assert_eq!(q.read(&id).unwrap().3, Location::Hold);
            assert!(q.release(&id).unwrap());
            let mut st2 = st.clone();
            st2.attempts = 3;
            q.write_state(&id, &st2).unwrap();
            assert_eq!(q.read(&id).unwrap().1.attempts, 3);

            // The durable file carries the complete mark.
            let path = dir.path().join("active").join(&id);
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, COMPLETE_MODE, "{mode:o}");

            // A whole file without the mark (the process stopped before its sync) is not
            // listed while the queue runs; recovery makes it durable and marks it.
            let full = fs::read(&path).unwrap();
            let unmarked = dir.path().join("active").join("UNMARKED1");
            fs::write(&unmarked, &full).unwrap();
            fs::set_permissions(&unmarked, fs::Permissions::from_mode(WRITING_MODE)).unwrap();
            assert_eq!(q.list().unwrap().len(), 1);

            // A partial file in active/ and a leftover in tmp/ are removed on recovery.
            fs::write(
                dir.path().join("active").join("PARTIAL1"),
                &full[..full.len() - 10],
            )
            .unwrap();
            fs::write(dir.path().join("tmp").join("X"), b"junk").unwrap();
            let (q2, rec) = Queue::open(
                dir.path(),
                SyncMode::PerMessage,
                Histogram::new([0.1]),
                Histogram::new([1.0]),
            )
            .unwrap();
            assert_eq!(rec.kept, 2);
            assert_eq!(rec.removed, 1);
            assert_eq!(rec.tmp_removed, 1);
            assert_eq!(q2.list().unwrap().len(), 2);
            q2.delete("UNMARKED1").unwrap();
            q2.delete(&id).unwrap();
            assert!(q2.list().unwrap().is_empty());
            assert!(matches!(q2.delete(&id), Err(QueueError::NotFound(_))));
            assert!(matches!(q2.read("../etc"), Err(QueueError::NotFound(_))));
        }
    }

    #[test]
    fn recovery_keeps_messages_of_another_version() {
        let dir = tempfile::tempdir().unwrap();
        Queue::open_dir(dir.path()).unwrap();
        let newer = format::tests::raw_file(b"hello\r\n", r#"{"version":2}"#);
        let path = dir.path().join("active").join("NEWER1");
        fs::write(&path, &newer).unwrap();
        let (q, rec) = Queue::open(
            dir.path(),
            SyncMode::PerMessage,
            Histogram::new([0.1]),
            Histogram::new([1.0]),
        )
        .unwrap();
        assert_eq!((rec.kept, rec.removed, rec.other_version), (1, 0, 1));
        assert!(path.exists(), "never removed as partial");
        let err = q.read("NEWER1").unwrap_err().to_string();
        assert!(err.contains("envelope version 2"), "{err}");
    }
}
