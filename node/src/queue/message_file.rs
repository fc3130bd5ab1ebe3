//! One message file being written: created in `active/` under its final id (mode 0600, so
//! listings and the delivery engine skip it), its message bytes appended as they come, the
//! envelope and footer written last. The same writer serves a message received whole (one
//! vectored write) and content streamed to disk while it is still arriving (DATA or BDAT
//! beyond `limits.contentSpillBytes`).
//!
//! A file that is not finished is removed when its [`MessageFile`] is dropped (the session
//! ended, the message was refused); one left behind by a process that stopped has no valid
//! footer and is removed by start-up recovery. Neither ever got its 250.

use std::fs::{self, File, OpenOptions};
use std::io::{IoSlice, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::format::{Envelope, MessageDigest};
use super::{QueueError, WRITING_MODE, io};

/// `write_all` for several buffers in as few system calls as the kernel allows.
fn write_all_vectored(f: &mut File, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match f.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A message file being written; removed on drop unless finished.
#[derive(Debug)]
pub struct MessageFile {
    id: String,
    path: PathBuf,
    file: Option<File>,
    digest: MessageDigest,
}

impl MessageFile {
    /// Create `dir/id`; fails if it exists.
    pub(super) fn create(dir: &Path, id: &str) -> Result<Self, QueueError> {
        let path = dir.join(id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(WRITING_MODE)
            .open(&path)
            .map_err(io("create", &path))?;
        Ok(Self {
            id: id.to_owned(),
            path,
            file: Some(file),
            digest: MessageDigest::default(),
        })
    }

    /// The message's queue id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Message bytes written so far.
    pub fn len(&self) -> u64 {
        self.digest.len() as u64
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.digest.is_empty()
    }

    fn write(&mut self, parts: &[&[u8]]) -> Result<(), QueueError> {
        let Some(file) = self.file.as_mut() else {
            return Err(io("write", &self.path)(std::io::ErrorKind::NotFound.into()));
        };
        let mut bufs: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        write_all_vectored(file, &mut bufs).map_err(io("write", &self.path))
    }

    /// Append message bytes.
    pub(super) fn append(&mut self, parts: &[&[u8]]) -> Result<(), QueueError> {
        self.write(parts)?;
        for p in parts {
            self.digest.update(p);
        }
        Ok(())
    }

    /// Write the last message bytes, the envelope and the footer. Returns the file's size and
    /// the open file for the durability step; from here on the caller owns the file on disk
    /// (it removes it with [`super::Queue::discard`] if that step fails).
    pub(super) fn finish(
        mut self,
        env: &Envelope,
        tail: &[&[u8]],
    ) -> Result<(u64, File), QueueError> {
        let written = self.len();
        let mut digest = std::mem::take(&mut self.digest);
        for p in tail {
            digest.update(p);
        }
        let trailer = digest.trailer(env)?;
        let mut parts = tail.to_vec();
        parts.push(&trailer);
        let (size, file) = self.close(&parts)?;
        Ok((written + size, file))
    }

    /// Write the last bytes, the caller's trailer ([`super::format::trailer`]) among them, and
    /// hand out the file as [`MessageFile::finish`] does. Returns the bytes written here.
    pub(super) fn close(mut self, parts: &[&[u8]]) -> Result<(u64, File), QueueError> {
        self.write(parts)?;
        let size = parts.iter().map(|p| p.len() as u64).sum::<u64>();
        let file = self
            .file
            .take()
            .ok_or_else(|| io("finish", &self.path)(std::io::ErrorKind::NotFound.into()))?;
        Ok((size, file))
    }
}

impl Drop for MessageFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::format;

    #[test]
    fn pieces_make_the_same_file_as_one_write_and_unfinished_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let env = format::tests::sample();
        let parts: [&[u8]; 2] = [b"Received: x\r\n", b"body\r\n"];
        let trailer = format::trailer(&env, &parts).unwrap();
        let (size, _) = MessageFile::create(dir.path(), "A1")
            .unwrap()
            .close(&[parts[0], parts[1], &trailer])
            .unwrap();
        let mut f = MessageFile::create(dir.path(), "B1").unwrap();
        f.append(&[b"Received: x\r\n", b"bo"]).unwrap();
        f.append(&[b"dy"]).unwrap();
        assert_eq!(f.len(), 17);
        let (size_b, _) = f.finish(&env, &[b"\r\n"]).unwrap();
        let a = fs::read(dir.path().join("A1")).unwrap();
        let b = fs::read(dir.path().join("B1")).unwrap();
        assert_eq!(a, b);
        assert_eq!(size, a.len() as u64);
        assert_eq!(size_b, size);
        let (decoded, range) = format::decode(&b).unwrap();
        assert_eq!(decoded, env);
        assert_eq!(&b[range], b"Received: x\r\nbody\r\n");

        let mut partial = MessageFile::create(dir.path(), "C1").unwrap();
        partial.append(&[b"half a message"]).unwrap();
        assert!(dir.path().join("C1").exists());
        drop(partial);
        assert!(
            !dir.path().join("C1").exists(),
            "dropped unfinished: removed"
        );
        assert!(
            MessageFile::create(dir.path(), "A1").is_err(),
            "ids are never reused"
        );
    }
}
