//! What the disk allows a mail queue: durable 10 KiB files per second, each created, written
//! and made durable by one of `threads` writers that waits until its file is durable (as an
//! MTA waits before it answers 250). Two ways to make them durable:
//! - `group syncfs`: one `syncfs(2)` of the file system shared by every file written while
//!   the previous one ran (group commit; the best case, and what mailnode does by default);
//! - `per file`: `fdatasync` of the file and `fsync` of its directory for each file.
//!
//! No SMTP, no queue format, no marks: the rate an MTA on this disk cannot beat.
//! Usage: `cargo bench -p mailnode --bench disk_rate -- DIR [THREADS] [FILES] [SIZE]`
//! (default 50 threads, 8000 files of 10240 bytes). Files are left in `DIR/<mode>/` (deleting
//! them at once would slow the next run's allocations on ext4); the caller removes `DIR`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    GroupSyncfs,
    PerFile,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::GroupSyncfs => "group syncfs",
            Mode::PerFile => "per file",
        }
    }
}

/// Sync generations: a writer needs a sync that started after its write.
#[derive(Default)]
struct Syncs {
    started: u64,
    wanted: u64,
    done: u64,
    stop: bool,
}

struct Group {
    state: Mutex<Syncs>,
    cv: Condvar,
}

impl Group {
    fn wait_durable(&self) {
        let mut s = self.state.lock().expect("lock");
        let target = s.started + 1;
        s.wanted = s.wanted.max(target);
        self.cv.notify_all();
        while s.done < target {
            s = self.cv.wait(s).expect("lock");
        }
    }

    fn run_syncer(&self, dir: &File) {
        let mut s = self.state.lock().expect("lock");
        loop {
            while s.wanted <= s.done && !s.stop {
                s = self.cv.wait(s).expect("lock");
            }
            if s.stop {
                return;
            }
            s.started += 1;
            let generation = s.started;
            drop(s);
            rustix::fs::syncfs(dir).expect("syncfs");
            s = self.state.lock().expect("lock");
            s.done = generation;
            self.cv.notify_all();
        }
    }
}

fn run(dir: &Path, mode: Mode, threads: usize, files: usize, size: usize) -> f64 {
    std::fs::create_dir_all(dir).expect("create directory");
    let dir_file = Arc::new(File::open(dir).expect("open directory"));
    let group = Arc::new(Group {
        state: Mutex::new(Syncs::default()),
        cv: Condvar::new(),
    });
    let syncer = (mode == Mode::GroupSyncfs).then(|| {
        let (g, d) = (Arc::clone(&group), Arc::clone(&dir_file));
        std::thread::spawn(move || g.run_syncer(&d))
    });
    let next = Arc::new(AtomicUsize::new(0));
    let content = Arc::new(vec![b'x'; size]);
    let t0 = Instant::now();
    let writers: Vec<_> = (0..threads)
        .map(|_| {
            let (dir, next, content) = (dir.to_owned(), Arc::clone(&next), Arc::clone(&content));
            let (group, dir_file) = (Arc::clone(&group), Arc::clone(&dir_file));
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= files {
                        return;
                    }
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(dir.join(format!("f{i:08}")))
                        .expect("create file");
                    f.write_all(&content).expect("write");
                    match mode {
                        Mode::GroupSyncfs => group.wait_durable(),
                        Mode::PerFile => {
                            f.sync_data().expect("fdatasync");
                            dir_file.sync_all().expect("fsync directory");
                        }
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    let rate = files as f64 / t0.elapsed().as_secs_f64();
    if let Some(s) = syncer {
        group.state.lock().expect("lock").stop = true;
        group.cv.notify_all();
        s.join().expect("syncer thread");
    }
    rate
}

fn main() {
    // `cargo bench` passes `--bench`; the rest are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: disk_rate DIR [THREADS] [FILES] [SIZE]");
        std::process::exit(2);
    };
    let num = |i: usize, default: usize| {
        args.get(i)
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    let (threads, files, size) = (num(1, 50), num(2, 8000), num(3, 10240));
    println!(
        "{:<14} {:>8} {:>8} {:>10}",
        "durable by", "threads", "files", "files/s"
    );
    for mode in [Mode::GroupSyncfs, Mode::PerFile] {
        let sub = dir.join(mode.name().replace(' ', "-"));
        let rate = run(&sub, mode, threads, files, size);
        println!(
            "{:<14} {:>8} {:>8} {:>10.0}",
            mode.name(),
            threads,
            files,
            rate
        );
    }
}
