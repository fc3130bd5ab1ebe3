//! SMTP AUTH users: a file of `user:hash` lines (argon2 `$argon2...` or bcrypt `$2a$/$2b$/$2y$`),
//! reloaded when it changes. Blank lines and `#` comments are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use argon2::PasswordVerifier as _;

/// Errors loading the users file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Could not read.
    #[error("cannot read users file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad line.
    #[error("users file {path} line {line}: {message}")]
    Syntax {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: &'static str,
    },
}

/// Parsed users.
#[derive(Debug, Clone, Default)]
pub struct Users {
    map: HashMap<String, String>,
}

/// A bcrypt hash of a random password, used to spend the same time on unknown users.
const DUMMY_BCRYPT: &str = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";

impl Users {
    /// Parse file content.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AuthError> {
        let mut map = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message| AuthError::Syntax {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected user:hash"))?;
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            if !(hash.starts_with("$argon2")
                || hash.starts_with("$2a$")
                || hash.starts_with("$2b$")
                || hash.starts_with("$2y$"))
            {
                return Err(err("hash must be argon2 or bcrypt"));
            }
            if hash.starts_with("$argon2") && argon2::PasswordHash::new(hash).is_err() {
                return Err(err("invalid argon2 hash"));
            }
            map.insert(user.to_owned(), hash.to_owned());
        }
        Ok(Self { map })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No users.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Check a password (CPU-heavy: call from a blocking thread).
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.map.get(user) else {
            let _ = bcrypt::verify(password, DUMMY_BCRYPT);
            return false;
        };
        verify_hash(hash, password)
    }
}

/// Check a password against an argon2 or bcrypt hash.
pub fn verify_hash(hash: &str, password: &str) -> bool {
    if hash.starts_with("$argon2") {
        match argon2::PasswordHash::new(hash) {
            Ok(parsed) => argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
            Err(_) => false,
        }
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

/// The users file, reloaded when its modification time changes.
#[derive(Debug)]
pub struct UsersFile {
    path: PathBuf,
    current: RwLock<(Option<SystemTime>, Arc<Users>)>,
}

impl UsersFile {
    /// Load.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let (mtime, users) = Self::read(path)?;
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new((mtime, Arc::new(users))),
        })
    }

    fn read(path: &Path) -> Result<(Option<SystemTime>, Users), AuthError> {
        let read_err = |source| AuthError::Read {
            path: path.to_owned(),
            source,
        };
        let mtime = std::fs::metadata(path).map_err(read_err)?.modified().ok();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok((mtime, Users::parse(&text, path)?))
    }

    /// Current users.
    pub fn users(&self) -> Arc<Users> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g.1),
            Err(p) => Arc::clone(&p.into_inner().1),
        }
    }

    /// Reload if the file changed. Returns true when reloaded; on error the old users stay.
    pub fn refresh(&self) -> Result<bool, AuthError> {
        let mtime = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| m.modified().ok());
        let old = match self.current.read() {
            Ok(g) => g.0,
            Err(p) => p.into_inner().0,
        };
        if mtime == old {
            return Ok(false);
        }
        let (mtime, users) = Self::read(&self.path)?;
        if let Ok(mut g) = self.current.write() {
            *g = (mtime, Arc::new(users));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHasher as _;

    #[test]
    fn argon2_and_bcrypt() {
        let salt = argon2::password_hash::SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let a = argon2::Argon2::default()
            .hash_password(b"secret1", &salt)
            .unwrap()
            .to_string();
        let b = bcrypt::hash("secret2", 4).unwrap();
        let text = format!("# users\nalice:{a}\n\nbob:{b}\n");
        let users = Users::parse(&text, Path::new("u")).unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.verify("alice", "secret1"));
        assert!(!users.verify("alice", "secret2"));
        assert!(users.verify("bob", "secret2"));
        assert!(!users.verify("bob", "x"));
        assert!(!users.verify("carol", "secret1"));
        assert!(Users::parse("x:plain", Path::new("u")).is_err());
        assert!(Users::parse("nocolon", Path::new("u")).is_err());
    }
}
