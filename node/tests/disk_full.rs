//! The queue's disk nearly (or really) full: the real `mailnode` binary refuses new mail
//! with a temporary error, reports not ready, queues nothing partial, and accepts again once
//! there is room.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::sink::wait_until;
use common::*;

const CONF: &str = r#"
hostname: smtp.test.example
listeners:
  - name: open
    address: 127.0.0.1:{port0}
    relay: {allowedSources: [127.0.0.2/32]}
queue: {path: "{dir}/queue", minFreeBytes: MINBYTES, minFreePercent: MINPCT}
limits: {shutdownGraceSeconds: 5}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
"#;

fn conf(min_bytes: u64, min_pct: u8) -> String {
    CONF.replace("MINBYTES", &min_bytes.to_string())
        .replace("MINPCT", &min_pct.to_string())
}

const MSG: &str = "Subject: disk test\r\n\r\nhello\r\n";

/// Available bytes of the file system holding `p` (statvfs, as an unprivileged user sees it).
fn avail(p: &Path) -> u64 {
    let st = rustix::fs::statvfs(p).unwrap();
    st.f_bavail * st.f_frsize
}

/// The log without terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut esc = false;
    for ch in log.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (false, c) => out.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    out
}

/// Rewrite the node's config and restart it (the config is read only at start-up).
fn restart_with(node: &mut Node, yaml: &str) {
    assert_eq!(
        node.term(Duration::from_secs(15)),
        Some(0),
        "{}",
        node.log()
    );
    std::fs::write(
        &node.config,
        render(yaml, &node.ports, node.admin, node.dir.path()),
    )
    .unwrap();
    node.spawn();
}

fn ehlo(node: &Node) -> Client {
    let (mut c, banner) = Client::connect("127.0.0.2", node.addr(0));
    assert!(banner.starts_with("220"), "{banner}");
    assert!(c.cmd("EHLO client.example").starts_with("250"));
    c
}

#[test]
fn min_free_bytes_above_free_space_refuses_with_452_and_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    // The queue lives in the temp dir's file system; ask for far more than it has free.
    let free = avail(dir.path());
    let min = free.saturating_mul(2).max(free + (1 << 30));
    let mut node = Node::start_in(dir, &conf(min, 0), 1);
    assert!(avail(&node.queue_dir()) < min);

    assert_eq!(node.http_get("/healthz").0, 200, "alive");
    let (code, body) = node.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk"), "{body}");

    let mut c = ehlo(&node);
    // Refused at MAIL, before the client sends any data.
    let r = c.cmd("MAIL FROM:<a@b.example>");
    assert!(r.starts_with("452 4.3.1"), "{r}");
    let r = c.cmd("RCPT TO:<r@x.example>");
    assert!(r.starts_with("503"), "no transaction after the 452: {r}");
    let r = c.cmd("DATA");
    assert!(!r.starts_with("354"), "{r}");
    // The session goes on (a temporary condition), a second try gets the same answer.
    assert!(c.cmd("NOOP").starts_with("250"));
    let r = c.cmd("MAIL FROM:<a@b.example> SIZE=100");
    assert!(r.starts_with("452 4.3.1"), "{r}");
    c.cmd("QUIT");
    assert!(node.queue_ids().is_empty());
    let active = std::fs::read_dir(node.queue_dir().join("active")).unwrap();
    assert_eq!(active.count(), 0, "nothing written");
    let (_, m) = node.http_get("/metrics");
    assert!(
        m.contains("mailnode_refused_total{reason=\"storage_low\"} 2"),
        "{m}"
    );

    // The percentage limit alone works the same way: ask for 100% free (any file system in
    // use has less).
    let st = rustix::fs::statvfs(node.queue_dir()).unwrap();
    if st.f_bavail < st.f_blocks {
        restart_with(&mut node, &conf(0, 100));
        assert_eq!(node.http_get("/readyz").0, 503);
        let mut c = ehlo(&node);
        let r = c.cmd("MAIL FROM:<a@b.example>");
        assert!(r.starts_with("452 4.3.1"), "{r}");
        c.cmd("QUIT");
    }

    // A normal limit: ready, and mail is accepted again.
    restart_with(&mut node, &conf(0, 0));
    assert_eq!(node.http_get("/readyz").0, 200);
    let mut c = ehlo(&node);
    let r = c.mail("a@b.example", &["r@x.example"], MSG);
    assert!(r.starts_with("250 2.0.0 OK queued"), "{r}");
    c.cmd("QUIT");
    assert_eq!(node.queue_ids().len(), 1);
}

/// Unmounts a tmpfs (lazily, so a process still in it does not block) and then removes the
/// temp dir it was in.
struct Tmpfs {
    mountpoint: PathBuf,
    root: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` at `root/queue`; `Err(reason)` when that is not permitted.
    fn mount(root: &Path, size: &str) -> Result<Tmpfs, String> {
        let mountpoint = root.join("queue");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&mountpoint)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            mountpoint,
            root: root.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Every file in `active/`, with whether it carries the complete mark (owner execute bit).
fn active_files(queue: &Path) -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = std::fs::read_dir(queue.join("active"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let mode = e.metadata().unwrap().permissions().mode();
            (
                e.file_name().to_string_lossy().into_owned(),
                mode & 0o100 != 0,
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn enospc_mid_message_is_a_temporary_error_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = match Tmpfs::mount(dir.path(), "2m") {
        Ok(t) => t,
        Err(why) => {
            unavailable(&format!("the real ENOSPC test needs a tmpfs: {why}"));
            return;
        }
    };
    // Declared after the guard: the node (and its process) is dropped first.
    let mut node = Node::start_in(dir, &conf(0, 0), 1);
    let queue = node.queue_dir();
    assert_eq!(queue, tmpfs.mountpoint);

    let mut c = ehlo(&node);
    let r = c.mail("a@b.example", &["r@x.example"], MSG);
    assert!(r.starts_with("250 2.0.0 OK queued"), "{r}");
    let first = queue_id(&r);

    // Leave about 64 KiB free, then send a 512 KiB message: the write fails part-way.
    let filler = queue.join("filler");
    let left = avail(&queue);
    std::fs::write(&filler, vec![b'x'; (left - 64 * 1024) as usize]).unwrap();
    let free = avail(&queue);
    assert!(free < 128 * 1024, "filler did not fill: {free}");
    let line = format!("{}\r\n", "y".repeat(76));
    let big = format!(
        "Subject: big\r\n\r\n{}",
        line.repeat(512 * 1024 / line.len())
    );
    let r = c.mail("a@b.example", &["r@x.example"], &big);
    assert!(
        r.starts_with("451") || r.starts_with("452"),
        "a full disk is a temporary failure: {r}\n{}",
        node.log()
    );
    assert!(
        plain(&node.log()).contains("No space left on device"),
        "a real ENOSPC: {}",
        node.log()
    );
    // The session can go on; the client may retry later.
    assert!(c.cmd("RSET").starts_with("250"));
    assert_eq!(
        active_files(&queue),
        [(first.clone(), true)],
        "only the first, complete message"
    );
    assert_eq!(node.queue_ids(), std::slice::from_ref(&first));

    // A crash and restart: recovery finds the one complete message and nothing partial.
    drop(c);
    node.kill9();
    node.spawn();
    assert_eq!(active_files(&queue), [(first.clone(), true)]);
    assert_eq!(node.queue_ids(), std::slice::from_ref(&first));
    let log = plain(&node.log());
    let recovered: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("queue recovered"))
        .collect();
    assert!(
        recovered
            .last()
            .is_some_and(|l| l.contains("kept=1") && l.contains("removed_partial=0")),
        "{recovered:?}"
    );

    // Room again: the same message is accepted and complete.
    std::fs::remove_file(&filler).unwrap();
    assert!(wait_until(Duration::from_secs(5), || node
        .http_get("/readyz")
        .0
        == 200));
    let mut c = ehlo(&node);
    let r = c.mail("a@b.example", &["r@x.example"], &big);
    assert!(r.starts_with("250 2.0.0 OK queued"), "{r}\n{}", node.log());
    let second = queue_id(&r);
    c.cmd("QUIT");
    let files = active_files(&queue);
    assert_eq!(files.len(), 2);
    assert!(files.iter().all(|(_, complete)| *complete), "{files:?}");
    let show = node.queue(&["show", &second, "--body"]);
    assert!(show.contains(&line), "whole body queued");
    node.kill9();
}
