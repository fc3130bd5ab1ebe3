//! A recording SMTP sink for delivery tests: accepts, tempfails (421 at connect or 451 at
//! RCPT), permfails (550 for chosen recipients or all) or hangs; records what it got by
//! Message-ID. Loopback only.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Accept,
    /// 421 greeting, then close.
    Tempfail421,
    /// 451 to every RCPT, saying the sender sends too much (as Microsoft 365 and Gmail do).
    Throttle451,
    /// 451 to every RCPT.
    Tempfail451,
    /// 550 to every RCPT.
    Permfail550,
    /// Accept the connection and never answer.
    Hang,
    /// Accept, answering the end of DATA only after 300 ms (a slow next hop).
    SlowData,
}

#[derive(Debug, Clone)]
pub struct Got {
    pub message_id: String,
    pub sender: String,
    pub rcpts: Vec<String>,
    pub data: String,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    reject: HashSet<String>,
    got: Vec<Got>,
    connections: usize,
    /// Sessions open now, and the most open at once.
    open: usize,
    max_open: usize,
}

/// Counts a session as open while it lives.
struct Open(Arc<Mutex<State>>);

impl Open {
    fn new(state: &Arc<Mutex<State>>) -> Open {
        let mut st = state.lock().unwrap();
        st.open += 1;
        st.max_open = st.max_open.max(st.open);
        Open(Arc::clone(state))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.lock().unwrap().open -= 1;
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn message_id(data: &str) -> String {
    for line in data.lines() {
        if line.to_ascii_lowercase().starts_with("message-id:") {
            return line[11..].trim().to_owned();
        }
        if line.is_empty() {
            break;
        }
    }
    String::new()
}

fn session(stream: TcpStream, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let _open = Open::new(&state);
    let mode = state.lock().unwrap().mode;
    match mode {
        Mode::Tempfail421 => {
            let _ = w.write_all(b"421 4.3.2 sink busy\r\n");
            return;
        }
        Mode::Hang => {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        _ => {}
    }
    let _ = w.write_all(b"220 sink.test ESMTP\r\n");
    let mut sender = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        }
        let cmd = line.trim_end().to_owned();
        let up = cmd.to_ascii_uppercase();
        let reply: String = if up.starts_with("EHLO") {
            "250-sink.test\r\n250-PIPELINING\r\n250-SIZE 10000000\r\n250 8BITMIME\r\n".into()
        } else if up.starts_with("HELO") {
            "250 sink.test\r\n".into()
        } else if up.starts_with("MAIL FROM:") {
            sender = cmd[10..]
                .split('>')
                .next()
                .unwrap_or("")
                .trim_start_matches('<')
                .to_owned();
            rcpts.clear();
            "250 2.1.0 ok\r\n".into()
        } else if up.starts_with("RCPT TO:") {
            let rc = cmd[8..]
                .split('>')
                .next()
                .unwrap_or("")
                .trim_start_matches('<')
                .to_owned();
            let st = state.lock().unwrap();
            if st.mode == Mode::Permfail550 || st.reject.contains(&rc) {
                "550 5.1.1 no such user here\r\n".into()
            } else if st.mode == Mode::Tempfail451 {
                "451 4.3.0 try again later\r\n".into()
            } else if st.mode == Mode::Throttle451 {
                "451 4.7.500 Server busy: too many messages, rate limited\r\n".into()
            } else {
                rcpts.push(rc);
                "250 2.1.5 ok\r\n".into()
            }
        } else if up == "DATA" {
            if rcpts.is_empty() {
                "554 5.5.1 no valid recipients\r\n".into()
            } else {
                let _ = w.write_all(b"354 go ahead\r\n");
                let mut data = String::new();
                loop {
                    let mut l = String::new();
                    match r.read_line(&mut l) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue;
                        }
                        Err(_) => return,
                    }
                    if l == ".\r\n" {
                        break;
                    }
                    data.push_str(l.strip_prefix('.').unwrap_or(&l));
                }
                let got = Got {
                    message_id: message_id(&data),
                    sender: sender.clone(),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                };
                state.lock().unwrap().got.push(got);
                if mode == Mode::SlowData {
                    std::thread::sleep(Duration::from_millis(300));
                }
                "250 2.0.0 ok: queued\r\n".into()
            }
        } else if up == "RSET" || up == "NOOP" {
            rcpts.clear();
            "250 2.0.0 ok\r\n".into()
        } else if up == "QUIT" {
            let _ = w.write_all(b"221 2.0.0 bye\r\n");
            return;
        } else {
            "502 5.5.2 what\r\n".into()
        };
        if w.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

impl Sink {
    pub fn start(ip: &str) -> Sink {
        Self::start_on(SocketAddr::new(ip.parse().unwrap(), 0))
    }

    /// Start on a given address (e.g. the same port again: "the primary is back").
    pub fn start_on(addr: SocketAddr) -> Sink {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Accept,
            reject: HashSet::new(),
            got: Vec::new(),
            connections: 0,
            open: 0,
            max_open: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        st.lock().unwrap().connections += 1;
                        let (st2, sp2) = (Arc::clone(&st), Arc::clone(&sp));
                        workers.push(std::thread::spawn(move || session(s, st2, sp2)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            drop(listener);
            for w in workers {
                let _ = w.join();
            }
        });
        Sink {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set_mode(&self, m: Mode) {
        self.state.lock().unwrap().mode = m;
    }

    pub fn reject(&self, rcpt: &str) {
        self.state.lock().unwrap().reject.insert(rcpt.to_owned());
    }

    pub fn got(&self) -> Vec<Got> {
        self.state.lock().unwrap().got.clone()
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// The message with this Message-ID (without brackets), waiting up to `within` for it.
    pub fn message(&self, id: &str, within: Duration) -> Got {
        let want = format!("<{id}>");
        let find = || self.got().into_iter().find(|g| g.message_id == want);
        assert!(
            wait_until(within, || find().is_some()),
            "{id} not delivered"
        );
        find().unwrap()
    }

    /// The most sessions that were open at once.
    pub fn max_open(&self) -> usize {
        self.state.lock().unwrap().max_open
    }

    /// Recipients delivered with this Message-ID (over all transactions).
    pub fn rcpts_of(&self, message_id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .got()
            .into_iter()
            .filter(|g| g.message_id == message_id)
            .flat_map(|g| g.rcpts)
            .collect();
        v.sort();
        v
    }

    /// Stop listening (connections are then refused) and end sessions.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until `f` is true (checked every 50 ms), at most `within`.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
