//! A connection from the source to the target, run by its own thread.
//!
//! The event loop must never wait for the network, so the main thread only
//! hands finished batches to a channel and picks up replies from another;
//! the thread does the blocking socket work: connect, AUTH, SELECT, then
//! write batches as they come (pipelined: the job keeps a few in flight) and
//! read their replies in order. Any socket error or a reply that takes
//! longer than TIMEOUT ends the thread with a `Failed` event; the job turns
//! that into a failed state, and every key without a processed
//! acknowledgement is still on the source.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::wire::{command, Encoded};

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// (user, password); user None for plain AUTH.
    pub auth: Option<(Option<String>, String)>,
    pub timeout: Duration,
    pub db: usize,
    /// This server's run id: a target answering with it is ourselves.
    pub own_run_id: String,
}

impl Endpoint {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// One element of a batch reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Int(i64),
    Error(String),
}

/// What the connection thread reports, in order.
#[derive(Debug)]
pub enum Event {
    /// Connected, authenticated and in the job's database; the target's run
    /// id (empty if its INFO had none).
    Ready(String),
    /// The reply to the oldest unanswered batch.
    Reply(Vec<Item>),
    /// The target rejected the oldest unanswered batch as a whole.
    Rejected(String),
    /// The connection is unusable; the thread has ended.
    Failed(String),
}

/// The main thread's handle on a connection thread.
pub struct Conn {
    batches: Option<Sender<Encoded>>,
    pub events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    socket: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
    /// Dropping lets the thread finish its queue (close_after_queued).
    graceful: bool,
}

impl Conn {
    pub fn open(ep: Endpoint) -> Result<Conn, String> {
        let (btx, brx) = channel::<Encoded>();
        let (etx, erx) = channel::<Event>();
        let stop = Arc::new(AtomicBool::new(false));
        let socket = Arc::new(Mutex::new(None));
        let (s2, sock2) = (stop.clone(), socket.clone());
        let thread = std::thread::Builder::new()
            .name("slots-migrate".into())
            .spawn(move || {
                // A panic here must not take the server down; report it.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&ep, brx, &etx, &s2, &sock2)
                }));
                let msg = match r {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(_) => "internal error in the connection thread".to_string(),
                };
                let _ = etx.send(Event::Failed(msg));
            })
            .map_err(|e| format!("cannot start a connection thread: {e}"))?;
        Ok(Conn {
            batches: Some(btx),
            events: erx,
            stop,
            socket,
            thread: Some(thread),
            graceful: false,
        })
    }

    /// Queues a batch for sending; false if the thread is gone.
    pub fn send(&self, b: Encoded) -> bool {
        self.batches.as_ref().is_some_and(|s| s.send(b).is_ok())
    }

    /// Stops the thread without waiting for it: unsent batches are dropped,
    /// a blocked read is interrupted by shutting the socket down.
    pub fn close(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.batches = None;
        if let Ok(g) = self.socket.lock() {
            if let Some(s) = g.as_ref() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Stops after sending what is queued and reading its replies (bounded
    /// by TIMEOUT); used to deliver a last ABORT batch on cancel.
    pub fn close_after_queued(&mut self) {
        self.batches = None;
        self.graceful = true;
    }

    /// Whether the thread has ended (after close(), soon).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.graceful {
            self.batches = None;
        } else {
            self.close();
        }
        if let Some(t) = self.thread.take() {
            // Never wait on the main thread: a thread still connecting ends
            // within TIMEOUT; the cron joins it then (`reap`).
            if let Ok(mut r) = ENDING.lock() {
                r.push((t, self.graceful));
            }
        }
    }
}

/// Threads of dropped connections, and whether each is delivering its last
/// batches (a graceful close) rather than just ending.
static ENDING: Mutex<Vec<(JoinHandle<()>, bool)>> = Mutex::new(Vec::new());

/// Joins the connection threads that have ended; true while some remain
/// (MODULE UNLOAD must wait for them: their code lives in this library).
pub fn reap() -> bool {
    let Ok(mut r) = ENDING.lock() else {
        return false;
    };
    let (done, running): (Vec<_>, Vec<_>) = r.drain(..).partition(|t| t.0.is_finished());
    *r = running;
    for (t, _) in done {
        let _ = t.join();
    }
    !r.is_empty()
}

/// Whether a closed connection is still delivering batches (a cancelled
/// job's last one, with its DELs, and those in flight before it). A new job
/// must not send anything until they are applied: the target could apply
/// an older copy of a key, or a DEL, after the new job's copy of it.
pub fn draining() -> bool {
    reap();
    ENDING
        .lock()
        .map(|r| r.iter().any(|(t, graceful)| *graceful && !t.is_finished()))
        .unwrap_or(false)
}

fn io_err(what: &str, e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("{what}: timed out")
        }
        _ => format!("{what}: {e}"),
    }
}

/// Reads one RESP line without the CRLF.
fn line(r: &mut impl BufRead) -> Result<Vec<u8>, String> {
    let mut l = Vec::new();
    r.read_until(b'\n', &mut l)
        .map_err(|e| io_err("reading the target's reply", e))?;
    if l.is_empty() {
        return Err("the target closed the connection".into());
    }
    while l.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        l.pop();
    }
    Ok(l)
}

/// A reply to a simple command (AUTH, SELECT): Ok for +OK.
fn simple_reply(r: &mut impl BufRead) -> Result<(), String> {
    let l = line(r)?;
    match l.first() {
        Some(b'+') => Ok(()),
        Some(b'-') => Err(String::from_utf8_lossy(&l[1..]).into_owned()),
        _ => Err(format!(
            "unexpected reply '{}'",
            String::from_utf8_lossy(&l)
        )),
    }
}

/// A bulk string reply (INFO).
fn bulk_reply(r: &mut impl BufRead) -> Result<Vec<u8>, String> {
    let l = line(r)?;
    match l.first() {
        Some(b'$') => {
            let n = int_of(&l[1..])?;
            if n < 0 {
                return Ok(Vec::new());
            }
            let mut b = vec![0; n as usize + 2];
            r.read_exact(&mut b)
                .map_err(|e| io_err("reading the target's reply", e))?;
            b.truncate(n as usize);
            Ok(b)
        }
        Some(b'-') => Err(String::from_utf8_lossy(&l[1..]).into_owned()),
        _ => Err(format!(
            "unexpected reply '{}'",
            String::from_utf8_lossy(&l)
        )),
    }
}

fn int_of(l: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(l)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad integer in reply: {}", String::from_utf8_lossy(l)))
}

/// The reply to one SLOTS.RESTORE.
fn batch_reply(r: &mut impl BufRead) -> Result<Event, String> {
    let l = line(r)?;
    match l.first() {
        Some(b'-') => Ok(Event::Rejected(
            String::from_utf8_lossy(&l[1..]).into_owned(),
        )),
        Some(b'*') => {
            let n = int_of(&l[1..])?;
            let mut items = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let e = line(r)?;
                items.push(match e.first() {
                    Some(b':') => Item::Int(int_of(&e[1..])?),
                    Some(b'-') => Item::Error(String::from_utf8_lossy(&e[1..]).into_owned()),
                    _ => {
                        return Err(format!(
                            "unexpected reply element '{}'",
                            String::from_utf8_lossy(&e)
                        ))
                    }
                });
            }
            Ok(Event::Reply(items))
        }
        Some(b'$') => {
            // Not ours, but keep the stream in sync before failing.
            let n = int_of(&l[1..])?;
            if n >= 0 {
                let mut b = vec![0; n as usize + 2];
                r.read_exact(&mut b)
                    .map_err(|e| io_err("reading the target's reply", e))?;
            }
            Err("unexpected bulk reply to SLOTS.RESTORE".into())
        }
        _ => Err(format!(
            "unexpected reply '{}'",
            String::from_utf8_lossy(&l)
        )),
    }
}

fn connect(ep: &Endpoint) -> Result<TcpStream, String> {
    let addrs = (ep.host.as_str(), ep.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", ep.addr()))?;
    let mut last = format!("cannot resolve {}", ep.addr());
    for a in addrs {
        match TcpStream::connect_timeout(&a, ep.timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = io_err(&format!("connecting to {}", ep.addr()), e),
        }
    }
    Err(last)
}

/// Poll interval while idle: how quickly the thread notices close().
const IDLE_POLL: Duration = Duration::from_millis(20);

fn run(
    ep: &Endpoint,
    batches: Receiver<Encoded>,
    events: &Sender<Event>,
    stop: &AtomicBool,
    socket: &Mutex<Option<TcpStream>>,
) -> Result<(), String> {
    let stream = connect(ep)?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(ep.timeout))
        .and_then(|_| stream.set_write_timeout(Some(ep.timeout)))
        .map_err(|e| format!("socket setup: {e}"))?;
    *socket.lock().map_err(|_| "poisoned lock")? = stream.try_clone().ok();
    let mut w = stream
        .try_clone()
        .map_err(|e| format!("socket setup: {e}"))?;
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    if let Some((user, pass)) = &ep.auth {
        let cmd = match user {
            Some(u) => command(&[b"AUTH", u.as_bytes(), pass.as_bytes()]),
            None => command(&[b"AUTH", pass.as_bytes()]),
        };
        w.write_all(&cmd).map_err(|e| io_err("sending AUTH", e))?;
        simple_reply(&mut r).map_err(|e| format!("AUTH failed: {e}"))?;
    }
    // A job to this very server would delete each key right after
    // restoring it over itself; refuse it by run id.
    w.write_all(&command(&[b"INFO", b"server"]))
        .map_err(|e| io_err("sending INFO", e))?;
    let info = bulk_reply(&mut r)?;
    let run_id = String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("run_id:").map(|v| v.trim().to_string()));
    if run_id
        .as_ref()
        .is_some_and(|id| !ep.own_run_id.is_empty() && *id == ep.own_run_id)
    {
        return Err(format!("{} is this server itself", ep.addr()));
    }
    let db = ep.db.to_string();
    w.write_all(&command(&[b"SELECT", db.as_bytes()]))
        .map_err(|e| io_err("sending SELECT", e))?;
    simple_reply(&mut r).map_err(|e| format!("SELECT {db} failed: {e}"))?;
    let _ = events.send(Event::Ready(run_id.unwrap_or_default()));
    let mut outstanding = 0usize;
    // After a graceful close: the last replies must come within one TIMEOUT
    // in all, not one TIMEOUT each.
    let mut closing_by: Option<std::time::Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Send everything queued before waiting for a reply: the target
        // works on batch n+1 while we read the reply to batch n.
        loop {
            match batches.try_recv() {
                Ok(b) => {
                    w.write_all(&b.header)
                        .and_then(|_| w.write_all(&b.body))
                        .map_err(|e| io_err("sending a batch", e))?;
                    outstanding += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if outstanding == 0 {
                        return Ok(());
                    }
                    closing_by.get_or_insert_with(|| std::time::Instant::now() + ep.timeout);
                    break;
                }
            }
        }
        if outstanding > 0 {
            if let Some(by) = closing_by {
                let left = by.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(
                        "closing: the target did not answer the last batches in time".into(),
                    );
                }
                let _ = r.get_ref().set_read_timeout(Some(left));
            }
            let ev = batch_reply(&mut r)?;
            outstanding -= 1;
            // The job may have ended and dropped the receiver; after a
            // graceful close the replies are still read to the last one.
            // Closing with batches unanswered would make this side's kernel
            // answer the target's replies with a reset, on which the target
            // drops whatever it has not read yet: a cancel's last batch
            // (its DELs) would be lost while earlier ones were applied.
            let _ = events.send(ev);
            continue;
        }
        match batches.recv_timeout(IDLE_POLL) {
            Ok(b) => {
                w.write_all(&b.header)
                    .and_then(|_| w.write_all(&b.body))
                    .map_err(|e| io_err("sending a batch", e))?;
                outstanding += 1;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}
