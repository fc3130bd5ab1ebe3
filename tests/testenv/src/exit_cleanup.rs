//! Directories removed when the test process exits. A `TempDir` held by a `static` (the
//! shared control plane, a test binary's scratch directory) is never dropped, so without this
//! every run of a test binary would leave its directory in the temp dir.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

static PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn remove_all() {
    // `try_lock`: never block the exit on a thread that holds the lock.
    if let Ok(mut paths) = PATHS.try_lock() {
        for path in paths.drain(..) {
            // A process of the shared control plane may still write while it is being killed:
            // one retry covers a file created during the first pass.
            if std::fs::remove_dir_all(&path).is_err() {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// Removes `path` (a directory and everything in it) when the process exits normally.
pub fn remove_at_exit(path: PathBuf) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        #[allow(unsafe_code)]
        // SAFETY: `remove_all` is an `extern "C" fn()` that does not unwind (no panics: every
        // error is ignored) and touches only its own static.
        unsafe {
            libc::atexit(remove_all);
        }
    });
    if let Ok(mut paths) = PATHS.lock() {
        paths.push(path);
    }
}
