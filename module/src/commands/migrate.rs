//! SLOTS.MIGRATE, SLOTS.MIGRATE.KEYS, SLOTS.MIGRATE.STATUS,
//! SLOTS.MIGRATE.WAIT, SLOTS.MIGRATE.CANCEL (MIGRATION.md). Starting a job
//! only validates and queues it; the cron does the work (migrate_job.rs).

use std::collections::{HashSet, VecDeque};
use std::os::raw::c_int;
use std::time::Duration;

use redis_module::{raw, Context, RedisError, RedisResult, RedisString, RedisValue};

use super::{err, parse_i64, parse_slot};
use crate::ffi::{self, Ctx};
use crate::index::IndexMode;
use crate::migrate_job::{with_jobs, Job, JobState, Options, Scope, Waiter};
use crate::serializer::Limits;
use crate::state::with_state;
use crate::transport::Endpoint;
use crate::{redirect, tracking};

const DEFAULT_TIMEOUT_MS: i64 = 10_000;
const DEFAULT_MAXBULKS: i64 = 1000;
const DEFAULT_MAXBYTES: i64 = 1 << 20;
const MAX_PARALLEL: i64 = 16;

/// The part shared by SLOTS.MIGRATE and SLOTS.MIGRATE.KEYS: `host port
/// [options]` up to the SLOTS/KEYS keyword. Returns the options and the
/// index of the first argument after the keyword.
fn parse_common(
    args: &[RedisString],
    keyword: &str,
    db: usize,
    own_run_id: String,
) -> Result<(Options, usize), RedisError> {
    if args.len() < 5 {
        return Err(RedisError::WrongArity);
    }
    let host = args[1].to_string_lossy();
    if host.is_empty() {
        return Err(err("host must not be empty".into()));
    }
    let port = parse_i64(&args[2], "port")?;
    if !(1..=65535).contains(&port) {
        return Err(err(format!("port {port} is out of range [1, 65535]")));
    }
    let mut auth = None;
    let mut timeout = DEFAULT_TIMEOUT_MS;
    let mut max_bulks = DEFAULT_MAXBULKS;
    let mut max_bytes = DEFAULT_MAXBYTES;
    let mut parallel = 1;
    let mut i = 3;
    let need = |i: usize, n: usize, name: &str| -> Result<(), RedisError> {
        if i + n >= args.len() {
            return Err(err(format!("{name} needs {n} argument(s)")));
        }
        Ok(())
    };
    loop {
        let Some(a) = args.get(i) else {
            return Err(err(format!("missing {keyword}")));
        };
        let opt = a.to_string_lossy().to_ascii_uppercase();
        match opt.as_str() {
            o if o == keyword => break,
            "AUTH" => {
                need(i, 1, "AUTH")?;
                auth = Some((None, args[i + 1].to_string_lossy()));
                i += 2;
            }
            "AUTH2" => {
                need(i, 2, "AUTH2")?;
                auth = Some((
                    Some(args[i + 1].to_string_lossy()),
                    args[i + 2].to_string_lossy(),
                ));
                i += 3;
            }
            "TIMEOUT" | "MAXBULKS" | "MAXBYTES" | "PARALLEL" => {
                need(i, 1, &opt)?;
                let v = parse_i64(&args[i + 1], &opt)?;
                let (min, max) = match opt.as_str() {
                    "TIMEOUT" => (1, 86_400_000),
                    "MAXBULKS" => (1, 1_000_000),
                    "MAXBYTES" => (1024, 1 << 30),
                    _ => (1, MAX_PARALLEL),
                };
                if !(min..=max).contains(&v) {
                    return Err(err(format!("{opt} must be in {min}..{max}, got {v}")));
                }
                match opt.as_str() {
                    "TIMEOUT" => timeout = v,
                    "MAXBULKS" => max_bulks = v,
                    "MAXBYTES" => max_bytes = v,
                    _ => parallel = v,
                }
                i += 2;
            }
            _ => return Err(err(format!("unknown option '{}'", a.to_string_lossy()))),
        }
    }
    if i + 1 >= args.len() {
        return Err(err(format!("{keyword} needs at least one argument")));
    }
    let endpoint = Endpoint {
        host,
        port: port as u16,
        auth,
        timeout: Duration::from_millis(timeout as u64),
        db,
        own_run_id,
    };
    let opts = Options {
        endpoint,
        limits: Limits {
            max_bulks: max_bulks as u64,
            max_bytes: max_bytes as u64,
        },
        parallel: parallel as usize,
    };
    Ok((opts, i + 1))
}

/// Refuses what a job cannot do here.
fn check_can_migrate() -> Result<(), RedisError> {
    if with_state(|s| s.mode) != IndexMode::Full {
        return Err(err(
            "slot migration needs the full key index (slots.index-mode full)".into(),
        ));
    }
    Ok(())
}

fn run_id(ctx: Ctx) -> String {
    let info = ffi::server_info(ctx, "server");
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("run_id:").map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// `<run id prefix>-<job id>`: unique per job across servers and restarts,
/// it names the job's staging keys on the target.
fn source_id(ctx: Ctx, id: u64) -> String {
    let prefix: String = run_id(ctx).chars().take(12).collect();
    format!("{prefix}-{id}")
}

fn start(ctx: &Context, scope: Scope, opts: Options, db: usize) -> RedisResult {
    let c = Ctx::of(ctx);
    if crate::transport::draining() {
        return Err(err(
            "a cancelled job's connection is still delivering its last batch (it ends when the target \
             has answered, within its TIMEOUT); retry in a moment"
                .into(),
        ));
    }
    tracking::ensure_subscribed(c).map_err(err)?;
    let id = with_jobs(|j| j.next_id());
    let mut job = Job::new(id, source_id(c, id), db, scope, opts);
    job.connect().map_err(err)?;
    let what = match &job.scope {
        Scope::Slots { slots, .. } => format!("slots {}", slot_ranges(slots)),
        Scope::Keys { all, .. } => format!("{} named keys", all.len()),
    };
    redis_module::logging::log_notice(format!(
        "slots: migration job {id} started: {what} of db {db} to {}",
        job.target
    ));
    with_jobs(|j| j.add(job));
    redirect::update();
    Ok(RedisValue::Integer(id as i64))
}

/// SLOTS.MIGRATE host port [options] SLOTS slot [slot ...]
pub fn migrate(ctx: &Context, args: &[RedisString]) -> RedisResult {
    check_can_migrate()?;
    let db = ffi::selected_db(Ctx::of(ctx));
    let (opts, first) = parse_common(args, "SLOTS", db, run_id(Ctx::of(ctx)))?;
    let count = with_state(|s| s.slot_count());
    let mut slots = Vec::new();
    let mut seen = HashSet::new();
    for a in &args[first..] {
        let s = parse_slot(a, count)?;
        if seen.insert(s) {
            slots.push(s);
        }
    }
    let busy = with_jobs(|j| {
        j.running().filter(|x| x.db == db).find_map(|x| {
            let theirs = x.touched_slots();
            slots
                .iter()
                .find(|s| theirs.contains(s))
                .map(|s| (x.id, *s))
        })
    });
    if let Some((id, s)) = busy {
        return Err(err(format!(
            "slot {s} is already being migrated by job {id}"
        )));
    }
    let scope = Scope::Slots {
        pending: slots.iter().copied().collect(),
        slots,
        parked: Vec::new(),
        cursor: 0,
        candidates: VecDeque::new(),
    };
    start(ctx, scope, opts, db)
}

/// SLOTS.MIGRATE.KEYS host port [options] KEYS key [key ...]
pub fn migrate_keys(ctx: &Context, args: &[RedisString]) -> RedisResult {
    check_can_migrate()?;
    let db = ffi::selected_db(Ctx::of(ctx));
    let (opts, first) = parse_common(args, "KEYS", db, run_id(Ctx::of(ctx)))?;
    let mut all = HashSet::new();
    let mut queue = VecDeque::new();
    for a in &args[first..] {
        let k = a.as_slice().to_vec();
        if all.insert(k.clone()) {
            queue.push_back(k);
        }
    }
    let busy = with_jobs(|j| {
        j.running().filter(|x| x.db == db).find_map(|x| {
            all.iter()
                .find(|k| x.covers(with_state(|s| s.slot(k)), k))
                .map(|k| (x.id, String::from_utf8_lossy(k).into_owned()))
        })
    });
    if let Some((id, k)) = busy {
        return Err(err(format!(
            "key '{k}' is already being migrated by job {id}"
        )));
    }
    start(ctx, Scope::Keys { all, queue }, opts, db)
}

/// "1,5-9": compact slot list for STATUS and logs.
pub fn slot_ranges(slots: &[usize]) -> String {
    let mut v = slots.to_vec();
    v.sort_unstable();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(",")
}

fn status_of(job: &Job) -> RedisValue {
    let (kps, bps) = job.rates();
    let s = |v: &str| RedisValue::BulkString(v.to_string());
    let n = |v: u64| RedisValue::Integer(v as i64);
    let fields = vec![
        ("id", n(job.id)),
        ("state", s(job.state.name())),
        ("target", s(&job.target)),
        ("db", n(job.db as u64)),
        (
            "slots",
            s(&match &job.scope {
                Scope::Slots { slots, .. } => slot_ranges(slots),
                Scope::Keys { .. } => "-".into(),
            }),
        ),
        ("keys_moved", n(job.stats.keys_moved)),
        ("bytes_moved", n(job.stats.bytes_moved)),
        ("keys_remaining", n(job.keys_remaining())),
        ("keys_in_flight", n(job.keys_in_flight() as u64)),
        ("keys_resent", n(job.stats.keys_resent)),
        ("keys_skipped", n(job.stats.keys_skipped)),
        ("keys_frozen", n(job.frozen.len() as u64)),
        ("big_keys", n(job.stats.big_keys)),
        ("chunks_sent", n(job.stats.chunks_sent)),
        ("batches_sent", n(job.stats.batches_sent)),
        ("rate_keys_per_sec", n(kps)),
        ("rate_bytes_per_sec", n(bps)),
        ("max_step_usec", n(job.stats.max_step_usec)),
        ("max_step_cpu_usec", n(job.stats.max_step_cpu_usec)),
        ("steps", n(job.stats.steps)),
        ("steps_over_1ms", n(job.stats.steps_over_1ms)),
        ("steps_over_1ms_cpu", n(job.stats.steps_over_1ms_cpu)),
        ("errors", n(job.stats.errors)),
        (
            "last_error",
            s(match &job.state {
                JobState::Failed(e) => e,
                _ => &job.stats.last_error,
            }),
        ),
        ("started_at_ms", n(job.started_at_ms as u64)),
        ("elapsed_ms", n(job.elapsed().as_millis() as u64)),
    ];
    RedisValue::Array(
        fields
            .into_iter()
            .flat_map(|(k, v)| [RedisValue::BulkString(k.into()), v])
            .collect(),
    )
}

fn parse_id(arg: &RedisString) -> Result<u64, RedisError> {
    let v = parse_i64(arg, "job id")?;
    u64::try_from(v).map_err(|_| err("job id must be positive".into()))
}

fn no_such_job(id: u64) -> RedisError {
    err(format!("no such migration job {id}"))
}

/// SLOTS.MIGRATE.STATUS [id]
pub fn status(_ctx: &Context, args: &[RedisString]) -> RedisResult {
    match args.len() {
        1 => Ok(RedisValue::Array(with_jobs(|j| {
            j.list.iter().map(status_of).collect()
        }))),
        2 => {
            let id = parse_id(&args[1])?;
            with_jobs(|j| j.get(id).map(status_of)).ok_or_else(|| no_such_job(id))
        }
        _ => Err(RedisError::WrongArity),
    }
}

/// SLOTS.MIGRATE.CANCEL id
pub fn cancel(_ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() != 2 {
        return Err(RedisError::WrongArity);
    }
    let id = parse_id(&args[1])?;
    with_jobs(|j| {
        let job = j.get_mut(id).ok_or_else(|| no_such_job(id))?;
        if job.state != JobState::Running {
            return Err(err(format!(
                "migration job {id} is not running (it is {})",
                job.state.name()
            )));
        }
        job.stop(JobState::Cancelled);
        // Ends now unless acknowledged keys still wait for their delete
        // (then the next cron slice ends it).
        job.finish_if_stopped();
        j.prune();
        redis_module::logging::log_notice(format!("slots: migration job {id} cancelled"));
        Ok(RedisValue::SimpleStringStatic("OK"))
    })
}

/// SLOTS.MIGRATE.WAIT id [timeout-ms]
pub fn wait(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if !(2..=3).contains(&args.len()) {
        return Err(RedisError::WrongArity);
    }
    let id = parse_id(&args[1])?;
    let timeout = match args.get(2) {
        Some(a) => {
            let v = parse_i64(a, "timeout")?;
            if v < 0 {
                return Err(err("timeout must be >= 0".into()));
            }
            // The server adds it to the current time in ms.
            if v > i64::MAX / 4 {
                return Err(err("timeout is out of range".into()));
            }
            v
        }
        None => 0,
    };
    let state = with_jobs(|j| j.get(id).map(|x| x.state.name())).ok_or_else(|| no_such_job(id))?;
    let c = Ctx::of(ctx);
    if state != "running" || ffi::context_flags(c) & raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING != 0 {
        return Ok(RedisValue::SimpleStringStatic(state));
    }
    // SAFETY: the live command context; the callbacks are plain extern fns;
    // the private data given at unblock is a Box<&'static str> that
    // free_state releases.
    let bc = unsafe {
        raw::RedisModule_BlockClient.unwrap()(
            c.raw(),
            Some(wait_reply),
            Some(wait_timeout),
            Some(free_state),
            timeout,
        )
    };
    // SAFETY: a handle just returned by BlockClient; the callback is a
    // plain extern fn.
    unsafe { raw::RedisModule_SetDisconnectCallback.unwrap()(bc, Some(wait_disconnected)) };
    crate::migrate_job::add_waiter(id, Waiter(bc));
    Ok(RedisValue::NoReply)
}

extern "C" fn wait_reply(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut *mut raw::RedisModuleString,
    _argc: c_int,
) -> c_int {
    // SAFETY: the private data is the Box<&'static str> given at unblock.
    unsafe {
        let p = raw::RedisModule_GetBlockedClientPrivateData.unwrap()(ctx) as *const &'static str;
        let state = if p.is_null() { "done" } else { *p };
        let s = std::ffi::CString::new(state).unwrap_or_default();
        raw::RedisModule_ReplyWithSimpleString.unwrap()(ctx, s.as_ptr());
    }
    raw::REDISMODULE_OK as c_int
}

extern "C" fn wait_timeout(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut *mut raw::RedisModuleString,
    _argc: c_int,
) -> c_int {
    // SAFETY: the live context of the timed-out client.
    unsafe { raw::RedisModule_ReplyWithSimpleString.unwrap()(ctx, c"running".as_ptr()) };
    // SAFETY: as above; in a timeout callback the context has a handle.
    release_waiter(unsafe { raw::RedisModule_GetBlockedClientHandle.unwrap()(ctx) });
    raw::REDISMODULE_OK as c_int
}

extern "C" fn wait_disconnected(
    _ctx: *mut raw::RedisModuleCtx,
    bc: *mut raw::RedisModuleBlockedClient,
) {
    release_waiter(bc);
}

/// A waiter that timed out or whose client went away: the server keeps the
/// handle (and its reply client, ~16 KB) until the module unblocks it, so
/// it is taken off its job and released now, not when the job ends: a
/// client polling WAIT with a short timeout during a long job would
/// otherwise pile them up.
fn release_waiter(bc: *mut raw::RedisModuleBlockedClient) {
    if bc.is_null() {
        return;
    }
    if crate::migrate_job::remove_waiter(bc) {
        // SAFETY: the handle is live (the server frees it only after an
        // unblock is processed) and was still on the list, so nothing has
        // unblocked it: this is the only unblock.
        unsafe { raw::RedisModule_UnblockClient.unwrap()(bc, std::ptr::null_mut()) };
    }
}

extern "C" fn free_state(_ctx: *mut raw::RedisModuleCtx, p: *mut std::os::raw::c_void) {
    if !p.is_null() {
        // SAFETY: created by Box::into_raw in migrate_job::Job::finish.
        drop(unsafe { Box::from_raw(p as *mut &'static str) });
    }
}
