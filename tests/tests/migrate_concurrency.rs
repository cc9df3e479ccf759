//! Writers hammer keys of the migrating slots during a job, following -ASK
//! to the target and retrying -TRYAGAIN (MIGRATION.md). A model of every
//! acknowledged write is checked at the end: every key lives on exactly one
//! server (the target), nothing is lost, nothing is applied twice.
//!
//! The job is throttled (keys/s) so that it is certainly still running
//! while the writers write: the writers stop once 60% of the keys have
//! moved, the test asserts the job is still running at that point, then
//! lifts the throttle and lets the job finish. (After a job ends the source
//! no longer redirects, so writes racing with the end would go to the
//! source: a proxy switches routing at that point.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use slotfork_tests::migrate::*;
use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

const NCOUNTERS: usize = 8;
const NLISTS: usize = 4;
const NHASHES: usize = 4;
const NSETS: usize = 4;

struct Names {
    counters: Vec<String>,
    lists: Vec<String>,
    hashes: Vec<String>,
    sets: Vec<String>,
    bighash: String,
    biglist: String,
    tags: Vec<String>,
}

fn names(slots: &[u32]) -> Names {
    let tags: Vec<String> = slots.iter().map(|&s| tag_for_slot(H, s)).collect();
    let t = |i: usize| tags[i % tags.len()].clone();
    Names {
        counters: (0..NCOUNTERS)
            .map(|i| format!("{{{}}}:ctr:{i}", t(i)))
            .collect(),
        lists: (0..NLISTS)
            .map(|i| format!("{{{}}}:lst:{i}", t(i)))
            .collect(),
        hashes: (0..NHASHES)
            .map(|i| format!("{{{}}}:h:{i}", t(i)))
            .collect(),
        sets: (0..NSETS).map(|i| format!("{{{}}}:s:{i}", t(i))).collect(),
        bighash: format!("{{{}}}:bighash", t(0)),
        biglist: format!("{{{}}}:biglist", t(1)),
        tags,
    }
}

/// Acknowledged writes of one writer.
#[derive(Default)]
struct Acked {
    incrs: Vec<i64>,
    pushes: Vec<Vec<String>>,
    hset: Vec<BTreeSet<String>>,
    sadd: Vec<BTreeSet<String>>,
    big_hset: BTreeSet<String>,
    big_push: Vec<String>,
    strings: BTreeMap<String, String>,
    /// Where each unique written value was acknowledged (for diagnostics).
    served: BTreeMap<String, Served>,
    asks: u64,
    tryagains: u64,
    ops: u64,
}

fn writer(src: &Server, dst: &Server, n: &Names, w: usize, stop: Arc<AtomicBool>) -> Acked {
    let mut r = Router::new(src, dst, 0);
    let mut a = Acked {
        incrs: vec![0; NCOUNTERS],
        pushes: vec![Vec::new(); NLISTS],
        hset: vec![BTreeSet::new(); NHASHES],
        sadd: vec![BTreeSet::new(); NSETS],
        ..Default::default()
    };
    let mut i: usize = 0;
    let expect_ok = |what: &str, res: redis::RedisResult<redis::Value>| -> redis::Value {
        match res {
            Ok(v) => v,
            Err(e) => panic!("writer {w}: {what}: {}", err_text(&e)),
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let j = i / 7;
        let tag = &n.tags[i % n.tags.len()];
        match i % 7 {
            0 => {
                let k = &n.counters[j % NCOUNTERS];
                let (_, res) = r.exec(&["INCR", k.as_str()]);
                expect_ok("INCR", res);
                a.incrs[j % NCOUNTERS] += 1;
            }
            1 => {
                let k = &n.lists[j % NLISTS];
                let v = format!("w{w}:{i}");
                let (sv, res) = r.exec(&["RPUSH", k.as_str(), v.as_str()]);
                expect_ok("RPUSH", res);
                a.served.insert(v.clone(), sv);
                a.pushes[j % NLISTS].push(v);
            }
            2 => {
                let k = &n.hashes[j % NHASHES];
                let f = format!("w{w}:{i}");
                let (sv, res) = r.exec(&["HSET", k.as_str(), f.as_str(), "val"]);
                expect_ok("HSET", res);
                a.served.insert(f.clone(), sv);
                a.hset[j % NHASHES].insert(f);
            }
            3 => {
                let k = &n.sets[j % NSETS];
                let m = format!("w{w}:{i}");
                let (sv, res) = r.exec(&["SADD", k.as_str(), m.as_str()]);
                expect_ok("SADD", res);
                a.served.insert(m.clone(), sv);
                a.sadd[j % NSETS].insert(m);
            }
            4 => {
                // Strings owned by this writer: the last acknowledged value wins.
                let k = format!("{{{tag}}}:str:w{w}:{}", j % 5);
                let v = format!("v{i}");
                let (_, res) = r.exec(&["SET", k.as_str(), v.as_str()]);
                expect_ok("SET", res);
                a.strings.insert(k, v);
            }
            5 => {
                let f = format!("w{w}:{i}");
                let (sv, res) = r.exec(&["HSET", n.bighash.as_str(), f.as_str(), "x"]);
                expect_ok("HSET big", res);
                a.served.insert(f.clone(), sv);
                a.big_hset.insert(f);
            }
            _ => {
                if j.is_multiple_of(2) {
                    let v = format!("w{w}:{i}");
                    let (sv, res) = r.exec(&["RPUSH", n.biglist.as_str(), v.as_str()]);
                    expect_ok("RPUSH big", res);
                    a.served.insert(v.clone(), sv);
                    a.big_push.push(v);
                } else {
                    // A key that did not exist before the job.
                    let k = format!("{{{tag}}}:new:w{w}:{i}");
                    let (_, res) = r.exec(&["SET", k.as_str(), "fresh"]);
                    expect_ok("SET new", res);
                    a.strings.insert(k, "fresh".into());
                }
            }
        }
        i += 1;
        a.ops += 1;
        if i.is_multiple_of(4) {
            thread::sleep(Duration::from_micros(300));
        }
    }
    a.asks = r.asks;
    a.tryagains = r.tryagains;
    a
}

/// Equal sets, or a panic naming what is missing (acknowledged, not on the
/// target) and what is extra.
fn same_members(got: &BTreeSet<String>, want: &BTreeSet<String>, what: &str, acked: &[Acked]) {
    if got == want {
        return;
    }
    let missing: Vec<String> = want
        .difference(got)
        .map(|m| format!("{m} (acknowledged by the {})", where_served(acked, m)))
        .collect();
    let extra: Vec<&String> = got.difference(want).collect();
    panic!(
        "{what}: {} on the target, {} acknowledged; acknowledged but missing: {missing:?}; extra: {extra:?}",
        got.len(),
        want.len()
    );
}

fn where_served(acked: &[Acked], v: &str) -> &'static str {
    match acked.iter().find_map(|a| a.served.get(v)) {
        Some(Served::Source) => "source",
        Some(Served::Target) => "target (after -ASK)",
        None => "?",
    }
}

fn populate(c: &mut redis::Connection, n: &Names, fillers: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for k in &n.counters {
        ok(c, &["SET", k.as_str(), "0"]);
    }
    for k in &n.lists {
        ok(c, &["RPUSH", k.as_str(), "init"]);
    }
    for k in &n.hashes {
        ok(c, &["HSET", k.as_str(), "init", "1"]);
    }
    for k in &n.sets {
        ok(c, &["SADD", k.as_str(), "init"]);
    }
    fill_big(c, &n.bighash, "hash", 3000);
    fill_big(c, &n.biglist, "list", 3000);
    for t in &n.tags {
        let f: Vec<String> = (0..fillers)
            .map(|i| format!("{{{t}}}:filler:{i}"))
            .collect();
        set_many(c, &f);
        keys.extend(f);
    }
    keys
}

fn run_with_writers(opts: &[&str], nwriters: usize, keys_per_sec: u64, replicas: bool) {
    let a = Server::start();
    let b = Server::start();
    let reps = replicas.then(|| {
        (
            Server::builder().replica_of(&a).start(),
            Server::builder().replica_of(&b).start(),
        )
    });
    let mut ac = a.conn();
    let slots = [200u32, 201, 202];
    let n = names(&slots);
    let fillers = populate(&mut ac, &n, 60);
    let total = dbsize(&mut ac) as i64;
    let initial_big = snap_keys(&mut ac, &[n.bighash.clone(), n.biglist.clone()]);
    throttle(&mut ac, keys_per_sec, 0);
    let id = migrate_slots(&mut ac, b.port, opts, &slots);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Vec<Acked> = thread::scope(|sc| {
        let hs: Vec<_> = (0..nwriters)
            .map(|w| {
                let stop = stop.clone();
                let (a, b, n) = (&a, &b, &n);
                sc.spawn(move || writer(a, b, n, w, stop))
            })
            .collect();
        let t0 = Instant::now();
        let mut sc_conn = a.conn();
        wait_status(&mut sc_conn, id, "60% of the keys moved", |s| {
            s.state() != "running" || s.num("keys_moved") * 10 >= total * 6
        });
        stop.store(true, Ordering::SeqCst);
        let acked: Vec<Acked> = hs
            .into_iter()
            .map(|h| h.join().expect("writer panicked"))
            .collect();
        let s = status(&mut sc_conn, id);
        assert_eq!(
            s.state(),
            "running",
            "the throttled job ended while writers were writing (test premise): {s:?}"
        );
        eprintln!("writers ran {:?}; status {s:?}", t0.elapsed());
        acked
    });
    throttle(&mut ac, 0, 0);
    let s = finish_done(&a, id);
    let (ops, asks, tries): (u64, u64, u64) = acked.iter().fold((0, 0, 0), |x, y| {
        (x.0 + y.ops, x.1 + y.asks, x.2 + y.tryagains)
    });
    eprintln!("{ops} acknowledged writes, {asks} -ASK, {tries} -TRYAGAIN; final {s:?}");
    assert!(
        asks > 0,
        "no write was redirected: did any hammered key move while written?"
    );

    // Every key is on the target only.
    let mut bc = b.conn();
    let left = user_keys(&mut ac);
    assert!(
        left.is_empty(),
        "keys left on the source after a done job: {:?}",
        left.iter().take(10).map(|k| show(k)).collect::<Vec<_>>()
    );
    // The model.
    for (ci, k) in n.counters.iter().enumerate() {
        let want: i64 = acked.iter().map(|a| a.incrs[ci]).sum();
        let got = as_int(&ok(&mut bc, &["GET", k.as_str()]));
        assert_eq!(got, want, "{k}: counter vs acknowledged INCRs");
    }
    for (li, k) in n.lists.iter().enumerate() {
        let got: Vec<String> = as_array(&ok(&mut bc, &["LRANGE", k.as_str(), "0", "-1"]))
            .iter()
            .map(as_string)
            .collect();
        let want_len = 1 + acked.iter().map(|a| a.pushes[li].len()).sum::<usize>();
        if got.len() != want_len {
            let have: BTreeSet<&String> = got.iter().collect();
            let missing: Vec<String> = acked
                .iter()
                .flat_map(|a| a.pushes[li].iter())
                .filter(|v| !have.contains(v))
                .map(|v| format!("{v} (acknowledged by the {})", where_served(&acked, v)))
                .collect();
            panic!(
                "{k}: list length {} vs {want_len} acknowledged pushes (+1 initial); acknowledged but missing: {missing:?}",
                got.len()
            );
        }
        assert_eq!(got[0], "init");
        for (w, a) in acked.iter().enumerate() {
            let mine: Vec<&String> = got
                .iter()
                .filter(|v| v.starts_with(&format!("w{w}:")))
                .collect();
            let want: Vec<&String> = a.pushes[li].iter().collect();
            assert_eq!(mine, want, "{k}: writer {w}'s pushes, in order, once each");
        }
    }
    for (hi, k) in n.hashes.iter().enumerate() {
        let got: BTreeSet<String> = as_array(&ok(&mut bc, &["HKEYS", k.as_str()]))
            .iter()
            .map(as_string)
            .collect();
        let mut want: BTreeSet<String> = acked
            .iter()
            .flat_map(|a| a.hset[hi].iter().cloned())
            .collect();
        want.insert("init".into());
        same_members(&got, &want, &format!("{k}: hash fields"), &acked);
    }
    for (si, k) in n.sets.iter().enumerate() {
        let got: BTreeSet<String> = as_array(&ok(&mut bc, &["SMEMBERS", k.as_str()]))
            .iter()
            .map(as_string)
            .collect();
        let mut want: BTreeSet<String> = acked
            .iter()
            .flat_map(|a| a.sadd[si].iter().cloned())
            .collect();
        want.insert("init".into());
        same_members(&got, &want, &format!("{k}: set members"), &acked);
    }
    // Big hash: the initial fields plus every acknowledged HSET.
    let got = snap_key(&mut bc, n.bighash.as_bytes()).expect("big hash on target");
    let Content::Hash(got) = got.content else {
        panic!("big hash type")
    };
    let Content::Hash(init) = &initial_big[n.bighash.as_bytes()].content else {
        panic!()
    };
    let mut want = init.clone();
    for a in &acked {
        for f in &a.big_hset {
            want.insert(f.clone().into_bytes(), b"x".to_vec());
        }
    }
    if got != want {
        let g: BTreeSet<String> = got.keys().map(|k| show(k)).collect();
        let w: BTreeSet<String> = want.keys().map(|k| show(k)).collect();
        same_members(&g, &w, "big hash fields", &acked);
        panic!("big hash: same fields, different values");
    }
    // Big list: the initial elements, then each writer's pushes in order.
    let got = snap_key(&mut bc, n.biglist.as_bytes()).expect("big list on target");
    let Content::List(got) = got.content else {
        panic!("big list type")
    };
    let Content::List(init) = &initial_big[n.biglist.as_bytes()].content else {
        panic!()
    };
    assert_eq!(&got[..init.len()], &init[..], "big list prefix");
    let pushed: usize = acked.iter().map(|a| a.big_push.len()).sum();
    if got.len() != init.len() + pushed {
        let have: BTreeSet<String> = got.iter().map(|v| show(v)).collect();
        let missing: Vec<String> = acked
            .iter()
            .flat_map(|a| a.big_push.iter())
            .filter(|v| !have.contains(*v))
            .map(|v| format!("{v} (acknowledged by the {})", where_served(&acked, v)))
            .collect();
        panic!(
            "big list length {} vs {} (initial + acknowledged pushes); acknowledged but missing: {missing:?}",
            got.len(),
            init.len() + pushed
        );
    }
    for (w, a) in acked.iter().enumerate() {
        let mine: Vec<Vec<u8>> = got[init.len()..]
            .iter()
            .filter(|v| v.starts_with(format!("w{w}:").as_bytes()))
            .cloned()
            .collect();
        let want: Vec<Vec<u8>> = a.big_push.iter().map(|s| s.clone().into_bytes()).collect();
        assert!(
            mine == want,
            "big list: writer {w}'s pushes in order, once each"
        );
    }
    // Strings: last acknowledged value of each writer-owned key.
    for a in &acked {
        for (k, v) in &a.strings {
            assert_eq!(as_string(&ok(&mut bc, &["GET", k.as_str()])), *v, "{k}");
        }
    }
    for k in &fillers {
        assert_eq!(as_string(&ok(&mut bc, &["GET", k.as_str()])), "v", "{k}");
    }
    // Nothing else on the target.
    let strings: usize = acked.iter().map(|a| a.strings.len()).sum();
    let want_keys = fillers.len() + NCOUNTERS + NLISTS + NHASHES + NSETS + 2 + strings;
    assert_eq!(dbsize(&mut bc) as usize, want_keys, "target key count");
    assert!(staging_keys(&mut bc).is_empty());
    assert_exact(&mut ac, H);
    assert_exact(&mut bc, H);
    // Replicas end up with their primaries' data.
    if let Some((ar, br)) = &reps {
        for (p, r, what) in [(&a, ar, "source"), (&b, br, "target")] {
            wait_replica_sync(p, r);
            let (mut pc, mut rc) = (p.conn(), r.conn());
            assert_eq!(dbsize(&mut pc), dbsize(&mut rc), "{what} replica DBSIZE");
            assert_eq!(
                digest(&mut pc),
                digest(&mut rc),
                "{what} replica DEBUG DIGEST"
            );
            assert_eq!(
                slots_info(&mut pc),
                slots_info(&mut rc),
                "{what} replica SLOTS.INFO"
            );
        }
    }
}

#[test]
fn writers_during_a_job() {
    run_with_writers(&["MAXBULKS", "100"], 3, 40, false);
}

#[test]
fn writers_during_a_parallel_job() {
    run_with_writers(&["MAXBULKS", "100", "PARALLEL", "3"], 3, 40, false);
}

#[test]
fn writers_during_a_job_with_replicas() {
    run_with_writers(&["MAXBULKS", "100", "PARALLEL", "2"], 2, 40, true);
}

#[test]
fn writers_then_cancel_then_resume() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slots = [210u32, 211];
    let n = names(&slots);
    populate(&mut ac, &n, 40);
    throttle(&mut ac, 30, 0);
    let id = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &slots);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Vec<Acked> = thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|w| {
                let stop = stop.clone();
                let (a, b, n) = (&a, &b, &n);
                sc.spawn(move || writer(a, b, n, w, stop))
            })
            .collect();
        let mut c = a.conn();
        wait_status(&mut c, id, "20 keys moved", |s| s.num("keys_moved") >= 20);
        stop.store(true, Ordering::SeqCst);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(status(&mut ac, id).state(), "running");
    ok(&mut ac, &["SLOTS.MIGRATE.CANCEL", &id.to_string()]);
    throttle(&mut ac, 0, 0);
    // Counters: wherever they are now (source or target, equal if both),
    // they hold the acknowledged INCRs.
    let mut bc = b.conn();
    let src = snap_db(&mut ac);
    let dst = snap_db(&mut bc);
    let union = union_consistent(&src, &dst, "after CANCEL");
    for (ci, k) in n.counters.iter().enumerate() {
        let want: i64 = acked.iter().map(|a| a.incrs[ci]).sum();
        let Content::String(v) = &union[k.as_bytes()].content else {
            panic!()
        };
        assert_eq!(
            String::from_utf8_lossy(v),
            want.to_string(),
            "{k} after CANCEL"
        );
    }
    let s = migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &slots);
    assert_eq!(s.num("errors"), 0, "{s:?}");
    assert_eq!(user_keys(&mut ac).len(), 0);
    assert_same_data(&union, &snap_db(&mut bc), "after the second job");
    for (ci, k) in n.counters.iter().enumerate() {
        let want: i64 = acked.iter().map(|a| a.incrs[ci]).sum();
        assert_eq!(as_int(&ok(&mut bc, &["GET", k.as_str()])), want, "{k}");
    }
}

/// The expected state of one key: value and absolute expiry (-1 = none).
type Model = BTreeMap<String, Option<(String, i64)>>;

/// Keys of writer `w` (in the slots of `tags`), written with initial values.
fn mutator_init(c: &mut redis::Connection, tags: &[String], w: usize) -> (Vec<String>, Model) {
    let keys: Vec<String> = (0..40)
        .map(|i| format!("{{{}}}:m:w{w}:{i}", tags[i % tags.len()]))
        .collect();
    let mut model = Model::new();
    for k in &keys {
        let v = format!("init:{k}");
        ok(c, &["SET", k.as_str(), v.as_str()]);
        model.insert(k.clone(), Some((v, -1)));
    }
    (keys, model)
}

/// One writer over its own keys: SET, DEL, PEXPIREAT (far future), PERSIST,
/// APPEND, RENAME to a key of the same tag. Every acknowledged command is
/// applied to the model (and its reply checked against the model).
fn mutator_run(
    src: &Server,
    dst: &Server,
    keys: &[String],
    mut model: Model,
    stride: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (Model, u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut r = Router::new(src, dst, 0);
    let base = now_ms() + 10 * 86_400_000;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let i = rng.gen_range(0..keys.len());
        let k = keys[i].clone();
        let cur = model[&k].clone();
        match rng.gen_range(0..6) {
            0 => {
                let v = format!("v{n}");
                let (_, res) = r.exec(&["SET", k.as_str(), v.as_str()]);
                res.unwrap_or_else(|e| panic!("SET {k}: {}", err_text(&e)));
                model.insert(k, Some((v, -1)));
            }
            1 => {
                let (_, res) = r.exec(&["DEL", k.as_str()]);
                let d = as_int(&res.unwrap_or_else(|e| panic!("DEL {k}: {}", err_text(&e))));
                assert_eq!(d == 1, cur.is_some(), "DEL {k} replied {d}, model {cur:?}");
                model.insert(k, None);
            }
            2 => {
                let at = base + rng.gen_range(0..1_000_000i64);
                let (_, res) = r.exec(&["PEXPIREAT", k.as_str(), &at.to_string()]);
                let x = as_int(&res.unwrap_or_else(|e| panic!("PEXPIREAT {k}: {}", err_text(&e))));
                assert_eq!(
                    x == 1,
                    cur.is_some(),
                    "PEXPIREAT {k} replied {x}, model {cur:?}"
                );
                if let Some((v, _)) = cur {
                    model.insert(k, Some((v, at)));
                }
            }
            3 => {
                let (_, res) = r.exec(&["PERSIST", k.as_str()]);
                res.unwrap_or_else(|e| panic!("PERSIST {k}: {}", err_text(&e)));
                if let Some((v, _)) = cur {
                    model.insert(k, Some((v, -1)));
                }
            }
            4 => {
                let (_, res) = r.exec(&["APPEND", k.as_str(), "+"]);
                res.unwrap_or_else(|e| panic!("APPEND {k}: {}", err_text(&e)));
                let (v, t) = cur.unwrap_or((String::new(), -1));
                model.insert(k, Some((v + "+", t)));
            }
            _ => {
                // RENAME to another key of the same tag (same slot); the
                // destination takes the value and the expiry.
                let j = (i + stride) % keys.len();
                if cur.is_none() || j == i {
                    continue;
                }
                let to = keys[j].clone();
                // Keys on both sides -> -TRYAGAIN: not applied, move on.
                let (_, res) = r.exec_once(&["RENAME", k.as_str(), to.as_str()]);
                match res {
                    Ok(_) => {}
                    Err(e) if e.kind() == redis::ErrorKind::TryAgain => continue,
                    Err(e) => panic!("RENAME {k} {to}: {}", err_text(&e)),
                }
                model.insert(to, cur);
                model.insert(k, None);
            }
        }
        n += 1;
        if n.is_multiple_of(8) {
            thread::sleep(Duration::from_micros(500));
        }
    }
    (model, n)
}

#[test]
fn mixed_mutations_follow_the_model() {
    let seed = seed("mixed_mutations_follow_the_model");
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slots = [220u32, 221];
    let tags: Vec<String> = slots.iter().map(|&s| tag_for_slot(H, s)).collect();
    // Filler keys so that the throttled job lasts long enough.
    for t in &tags {
        set_many(&mut ac, &tagged_keys(t, 60));
    }
    let init: Vec<(Vec<String>, Model)> = (0..2).map(|w| mutator_init(&mut ac, &tags, w)).collect();
    let total = dbsize(&mut ac) as i64;
    throttle(&mut ac, 40, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &slots);
    let stop = Arc::new(AtomicBool::new(false));
    let models: Vec<(Model, u64)> = thread::scope(|sc| {
        let hs: Vec<_> = init
            .iter()
            .enumerate()
            .map(|(w, (keys, model))| {
                let stop = stop.clone();
                let (a, b, tags) = (&a, &b, &tags);
                let model = model.clone();
                sc.spawn(move || {
                    mutator_run(
                        a,
                        b,
                        keys,
                        model,
                        tags.len(),
                        seed.wrapping_add(w as u64),
                        stop,
                    )
                })
            })
            .collect();
        let mut c = a.conn();
        wait_status(&mut c, id, "60% of the keys moved", |s| {
            s.state() != "running" || s.num("keys_moved") * 10 >= total * 6
        });
        stop.store(true, Ordering::SeqCst);
        let models: Vec<(Model, u64)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let s = status(&mut c, id);
        assert_eq!(
            s.state(),
            "running",
            "test premise: the job outlives the writers: {s:?}"
        );
        models
    });
    throttle(&mut ac, 0, 0);
    finish_done(&a, id);
    let ops: u64 = models.iter().map(|m| m.1).sum();
    eprintln!("{ops} acknowledged mutations");
    assert!(
        user_keys(&mut ac).is_empty(),
        "source keeps keys after a done job"
    );
    let mut bc = b.conn();
    for (model, _) in &models {
        for (k, want) in model {
            let got = snap_key(&mut bc, k.as_bytes());
            match (want, got) {
                (None, None) => {}
                (None, Some(g)) => panic!("{k}: deleted (acknowledged) but on the target: {g:?}"),
                (Some((v, _)), None) => panic!("{k}: lost; expected value {v}"),
                (Some((v, t)), Some(g)) => {
                    assert_eq!(
                        g.content,
                        Content::String(v.clone().into_bytes()),
                        "{k}: value"
                    );
                    assert_eq!(g.expire_at_ms, *t, "{k}: PEXPIRETIME");
                }
            }
        }
    }
    assert_eq!(
        dbsize(&mut bc) as i64,
        120 + models
            .iter()
            .map(|m| m.0.values().filter(|v| v.is_some()).count() as i64)
            .sum::<i64>()
    );
    assert_exact(&mut bc, H);
}

/// One big hash written in a tight loop for the whole job: the job must still
/// converge (the key is blocked with -TRYAGAIN while it is finally sent), and
/// every acknowledged field is on the target.
#[test]
fn hot_big_key_converges() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slot = 230;
    let tag = tag_for_slot(H, slot);
    let key = format!("{{{tag}}}:hot");
    fill_big(&mut ac, &key, "hash", 20_000);
    set_many(&mut ac, &tagged_keys(&tag, 20));
    let stop = Arc::new(AtomicBool::new(false));
    let id = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &[slot]);
    let (fields, tries) = thread::scope(|sc| {
        let h = {
            let stop = stop.clone();
            let (a, b, key) = (&a, &b, &key);
            sc.spawn(move || {
                let mut r = Router::new(a, b, 0);
                let mut fields = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let f = format!("hot:{i}");
                    let (_, res) = r.exec(&["HSET", key.as_str(), f.as_str(), "1"]);
                    res.unwrap_or_else(|e| panic!("HSET: {}", err_text(&e)));
                    fields.push(f);
                    i += 1;
                }
                (fields, r.tryagains)
            })
        };
        let s = finish(&a, id);
        stop.store(true, Ordering::SeqCst);
        let out = h.join().unwrap();
        assert_eq!(
            s.state(),
            "done",
            "the job must converge under a hot key: {s:?}"
        );
        out
    });
    eprintln!("{} HSETs acknowledged, {tries} -TRYAGAIN", fields.len());
    // After the job, the writer's last HSETs may have gone to the source (no
    // more redirection once done): route them by hand.
    let mut bc = b.conn();
    let on_src: BTreeSet<String> = match snap_key(&mut ac, key.as_bytes()) {
        Some(KeySnap {
            content: Content::Hash(h),
            ..
        }) => h.keys().map(|k| show(k)).collect(),
        _ => BTreeSet::new(),
    };
    let Some(KeySnap {
        content: Content::Hash(got),
        ..
    }) = snap_key(&mut bc, key.as_bytes())
    else {
        panic!("hot key not on the target")
    };
    let got: BTreeSet<String> = got.keys().map(|k| show(k)).collect();
    for f in &fields {
        assert!(
            got.contains(f) || on_src.contains(f),
            "acknowledged field {f} lost"
        );
    }
    // Only writes after the end may be on the source.
    assert!(
        on_src.len() < 10_000,
        "{} fields on the source after the job",
        on_src.len()
    );
    assert!(got.len() >= 20_000, "{}", got.len());
}
