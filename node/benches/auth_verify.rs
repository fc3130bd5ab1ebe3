//! What an SMTP AUTH password check costs, and that an unknown user costs the same as a known
//! one (so that timing does not tell which users exist): `Users::verify` on one core for a
//! known user with the right password, with a wrong one, and an unknown user, with argon2id at
//! the parameters `mailnode hash-password` uses and with bcrypt. Prints a table; not a test.
//! Usage: `cargo bench -p mailnode --bench auth_verify -- [CHECKS]` (default 40 per row).

use std::path::Path;
use std::time::Instant;

use argon2::PasswordHasher as _;
use mailnode::auth::Users;

fn per_check_ms(users: &Users, user: &str, password: &str, n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(users.verify(user, password));
    }
    start.elapsed().as_secs_f64() * 1000.0 / n as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(40);
    let salt = argon2::password_hash::SaltString::encode_b64(b"mailcluster-bench")
        .map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::default()
        .hash_password(b"pw-alice", &salt)
        .map_err(|e| e.to_string())?
        .to_string();
    let bcrypt = bcrypt::hash("pw-alice", 10)?;
    println!(
        "| Hash | Known user, right password | Known user, wrong password | Unknown user | Unknown / known wrong |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (name, hash) in [
        ("argon2id (m=19456, t=2)", argon),
        ("bcrypt (cost 10)", bcrypt),
    ] {
        let users = Users::parse(&format!("alice:{hash}\n"), Path::new("users"))?;
        // Warm up (page in the argon2 memory once).
        users.verify("alice", "pw-alice");
        // Interleaved rounds, so that load from elsewhere hits every column alike.
        let (mut right, mut wrong, mut unknown) = (0.0, 0.0, 0.0);
        let rounds = 4;
        for _ in 0..rounds {
            right += per_check_ms(&users, "alice", "pw-alice", n / rounds);
            wrong += per_check_ms(&users, "alice", "nope", n / rounds);
            unknown += per_check_ms(&users, "mallory", "nope", n / rounds);
        }
        let r = rounds as f64;
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} |",
            right / r,
            wrong / r,
            unknown / r,
            unknown / wrong
        );
    }
    Ok(())
}
