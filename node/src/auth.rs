//! SMTP AUTH users: a file of `user:hash` lines (argon2 `$argon2...` or bcrypt `$2a$/$2b$/$2y$`),
//! reloaded when it changes. Blank lines and `#` comments are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

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
#[derive(Debug, Clone)]
pub struct Users {
    map: HashMap<String, String>,
    /// A hash of a random password with the algorithm and parameters most users' hashes have:
    /// checked for unknown users, so that they take as long as known ones.
    dummy: String,
}

/// The algorithm and cost of a stored hash: what makes checking it slow.
fn hash_kind(hash: &str) -> String {
    match argon2::PasswordHash::new(hash) {
        Ok(p) => format!(
            "{}${}${}",
            p.algorithm,
            p.version.unwrap_or_default(),
            p.params
        ),
        // bcrypt: `$2b$COST$...`
        Err(_) => hash.split('$').take(3).collect::<Vec<_>>().join("$"),
    }
}

/// A hash of a random password of the same kind as `template` (argon2 with its algorithm,
/// version and parameters, or bcrypt with its cost); argon2id with default parameters when
/// there is no template.
fn dummy_like(template: Option<&str>) -> String {
    use argon2::PasswordHasher as _;
    let mut secret = [0u8; 16];
    let _ = getrandom::fill(&mut secret);
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(t) = template.filter(|t| !t.starts_with("$argon2"))
        && let Some(cost) = t.split('$').nth(2).and_then(|c| c.parse().ok())
        && let Ok(h) = bcrypt::hash(&secret, cost)
    {
        return h;
    }
    let parsed = template.and_then(|t| argon2::PasswordHash::new(t).ok());
    let algorithm = parsed
        .as_ref()
        .and_then(|p| argon2::Algorithm::try_from(p.algorithm).ok())
        .unwrap_or_default();
    let version = parsed
        .as_ref()
        .and_then(|p| p.version)
        .and_then(|v| argon2::Version::try_from(v).ok())
        .unwrap_or_default();
    let params = parsed
        .as_ref()
        .and_then(|p| argon2::Params::try_from(p).ok())
        .unwrap_or_default();
    let mut salt = [0u8; 16];
    let _ = getrandom::fill(&mut salt);
    argon2::password_hash::SaltString::encode_b64(&salt)
        .ok()
        .and_then(|salt| {
            argon2::Argon2::new(algorithm, version, params)
                .hash_password(secret.as_bytes(), &salt)
                .ok()
                .map(|h| h.to_string())
        })
        .unwrap_or_default()
}

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
        // The most common kind of hash among the users (ties: the smallest hash, so that the
        // choice does not depend on the map's order).
        let mut kinds: HashMap<String, (usize, &str)> = HashMap::new();
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        for name in names {
            let hash = &map[name];
            kinds.entry(hash_kind(hash)).or_insert((0, hash)).0 += 1;
        }
        let template = kinds
            .values()
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
            .map(|(_, h)| *h);
        let dummy = dummy_like(template);
        Ok(Self { map, dummy })
    }

    /// The kind of hash checked for unknown users (`algorithm$version$params`, or bcrypt's
    /// `$2b$COST`): the same as the users' own.
    pub fn dummy_kind(&self) -> String {
        hash_kind(&self.dummy)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No users.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Check a password (CPU-heavy: call from a blocking thread). An unknown user costs the
    /// same check as a known one, against a hash of the same kind.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.verify_with(user, password, &mut Vec::new())
    }

    /// [`Users::verify`] with `blocks` as argon2's working memory: grown to the hash's memory
    /// cost if needed and kept by the caller, so that a checker thread reuses one allocation.
    pub fn verify_with(&self, user: &str, password: &str, blocks: &mut Vec<argon2::Block>) -> bool {
        match self.map.get(user) {
            Some(hash) => verify_hash_with(hash, password, blocks),
            None => {
                let _ = verify_hash_with(&self.dummy, password, blocks);
                false
            }
        }
    }
}

/// Check a password against an argon2 or bcrypt hash.
pub fn verify_hash(hash: &str, password: &str) -> bool {
    verify_hash_with(hash, password, &mut Vec::new())
}

fn verify_hash_with(hash: &str, password: &str, blocks: &mut Vec<argon2::Block>) -> bool {
    if hash.starts_with("$argon2") {
        verify_argon2(hash, password, blocks).unwrap_or(false)
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

/// Recompute an argon2 PHC hash of `password` in `blocks` and compare (in constant time).
fn verify_argon2(hash: &str, password: &str, blocks: &mut Vec<argon2::Block>) -> Option<bool> {
    let parsed = argon2::PasswordHash::new(hash).ok()?;
    let (salt, expected) = (parsed.salt?, parsed.hash?);
    let params = argon2::Params::try_from(&parsed).ok()?;
    let algorithm = argon2::Algorithm::try_from(parsed.algorithm).ok()?;
    let version = match parsed.version {
        Some(v) => argon2::Version::try_from(v).ok()?,
        None => argon2::Version::default(),
    };
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).ok()?;
    let n = params.block_count();
    if blocks.len() < n {
        blocks.resize(n, argon2::Block::default());
    }
    let ctx = argon2::Argon2::new(algorithm, version, params);
    let computed = argon2::password_hash::Output::init_with(expected.len(), |out| {
        ctx.hash_password_into_with_memory(password.as_bytes(), salt, out, &mut blocks[..n])
            .map_err(|_| argon2::password_hash::Error::Crypto)
    })
    .ok()?;
    // `Output`'s equality is constant-time.
    Some(computed == expected)
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
    }

    #[test]
    fn unknown_users_are_checked_against_a_hash_like_the_users_own() {
        let salt = argon2::password_hash::SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let params = argon2::Params::new(8192, 3, 1, None).unwrap();
        let argon = |pw: &[u8]| {
            argon2::Argon2::new(
                argon2::Algorithm::Argon2id,
                argon2::Version::V0x13,
                params.clone(),
            )
            .hash_password(pw, &salt)
            .unwrap()
            .to_string()
        };
        let bcrypt4 = bcrypt::hash("pw", 4).unwrap();
        // Two argon2id users with m=8192,t=3 and one bcrypt user: the dummy is that argon2id.
        let text = format!("a:{}\nb:{}\nc:{bcrypt4}\n", argon(b"x"), argon(b"y"));
        let users = Users::parse(&text, Path::new("u")).unwrap();
        assert_eq!(users.dummy_kind(), hash_kind(&argon(b"z")));
        assert!(
            users.dummy_kind().contains("m=8192,t=3,p=1"),
            "{}",
            users.dummy_kind()
        );
        assert!(!users.verify("nobody", "x"));
        // bcrypt users only: a bcrypt dummy of their cost.
        let users = Users::parse(&format!("c:{bcrypt4}\n"), Path::new("u")).unwrap();
        assert_eq!(users.dummy_kind(), "$2b$04");
        // No users: argon2id with the defaults `mailnode hash-password` uses.
        let users = Users::parse("", Path::new("u")).unwrap();
        assert!(
            users.dummy_kind().starts_with("argon2id$19$m=19456"),
            "{}",
            users.dummy_kind()
        );
        assert!(Users::parse("nocolon", Path::new("u")).is_err());
    }
}
