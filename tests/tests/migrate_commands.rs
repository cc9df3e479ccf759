//! SLOTS.MIGRATE / .KEYS / .STATUS / .WAIT / .CANCEL and the throttling
//! configs (MIGRATION.md, "Source commands").

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use slotfork_tests::migrate::*;
use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

const FIELDS: &[&str] = &[
    "id",
    "state",
    "target",
    "db",
    "slots",
    "keys_moved",
    "bytes_moved",
    "keys_remaining",
    "keys_in_flight",
    "keys_resent",
    "big_keys",
    "chunks_sent",
    "rate_keys_per_sec",
    "rate_bytes_per_sec",
    "max_step_usec",
    "steps",
    "steps_over_1ms",
    "steps_over_1ms_cpu",
    "errors",
    "last_error",
    "started_at_ms",
    "elapsed_ms",
];

fn fill_slots(c: &mut redis::Connection, slots: &[u32], per_slot: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for &s in slots {
        let k = tagged_keys(&tag_for_slot(H, s), per_slot);
        set_many(c, &k);
        keys.extend(k);
    }
    keys
}

fn no_error(s: &Status) {
    let e = s.get("last_error");
    assert!(e.is_empty() || e == "-", "last_error of a clean job: {s:?}");
    assert_eq!(s.num("errors"), 0, "{s:?}");
}

#[test]
fn status_fields_of_a_done_slot_job() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slots = [1u32, 5, 6, 7, 8, 9];
    let keys = fill_slots(&mut ac, &slots, 10);
    let t0 = now_ms();
    let w0 = Instant::now();
    let id = migrate_slots(&mut ac, b.port, &[], &[9, 5, 1, 7, 6, 8]);
    let s = finish_done(&a, id);
    let t1 = now_ms();
    for f in FIELDS {
        s.get(f);
    }
    assert_eq!(s.num("id"), id);
    assert_eq!(s.state(), "done");
    assert_eq!(s.get("target"), format!("127.0.0.1:{}", b.port));
    assert_eq!(s.get("db"), "0");
    assert_eq!(
        s.get("slots"),
        "1,5-9",
        "slot list is printed sorted with ranges"
    );
    assert_eq!(s.num("keys_moved") as usize, keys.len());
    assert!(s.num("bytes_moved") > 0, "{s:?}");
    assert_eq!(s.num("big_keys"), 0, "{s:?}");
    assert_eq!(
        s.num("chunks_sent"),
        0,
        "no big key, no CHUNK record: {s:?}"
    );
    assert!(s.num("keys_resent") >= 0);
    assert!(s.num("rate_keys_per_sec") >= 0 && s.num("rate_bytes_per_sec") >= 0);
    assert!(s.num("max_step_usec") > 0, "{s:?}");
    assert!(
        s.num("steps") > 0 && s.num("steps_over_1ms") <= s.num("steps"),
        "{s:?}"
    );
    no_error(&s);
    let started = s.num("started_at_ms");
    assert!(
        started >= t0 - 1000 && started <= t1 + 1000,
        "started_at_ms {started} not in [{t0}, {t1}]"
    );
    let el = s.num("elapsed_ms");
    assert!(
        el >= 0 && el <= w0.elapsed().as_millis() as i64 + 1000,
        "elapsed_ms {el}"
    );
    // A finished job's status does not change any more.
    std::thread::sleep(Duration::from_millis(50));
    let s2 = status(&mut ac, id);
    assert_eq!(
        s2.get("elapsed_ms"),
        s.get("elapsed_ms"),
        "elapsed_ms of a finished job is frozen"
    );
    assert_eq!(s2.get("keys_moved"), s.get("keys_moved"));
    // STATUS without id lists it.
    let all = status_all(&mut ac);
    assert!(all.iter().any(|x| x.num("id") == id), "{all:?}");
    // WAIT on a finished job answers its final state at once.
    assert_eq!(wait_job(&mut ac, id, 0), "done");
    assert_eq!(dbsize(&mut ac), 0);
    assert_eq!(dbsize(&mut b.conn()), keys.len() as u64);
}

#[test]
fn key_job_moves_one_hash_tag_group_only() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slot = H.slot(b"user:1");
    // The tag group, other keys of the same slot, and keys elsewhere.
    let group: Vec<String> = ["profile", "cart", "sessions", "feed"]
        .iter()
        .map(|n| format!("{{user:1}}:{n}"))
        .collect();
    ok(&mut ac, &["SET", &group[0], "p"]);
    ok(&mut ac, &["HSET", &group[1], "item", "3"]);
    ok(&mut ac, &["SADD", &group[2], "s1", "s2"]);
    fill_big(&mut ac, &group[3], "list", 5000);
    let same_slot = plain_keys_in_slot(H, slot, "other", 20);
    set_many(&mut ac, &same_slot);
    set_many(&mut ac, &tagged_keys("user:2", 10));
    let before = snap_keys(&mut ac, &group);
    let mut ask: Vec<String> = group.clone();
    ask.push("{user:1}:missing".into());
    let id = migrate_keys(&mut ac, b.port, &["MAXBULKS", "500"], &ask);
    let s = finish_done(&a, id);
    assert_eq!(s.get("slots"), "-", "a key job has no slots: {s:?}");
    assert_eq!(s.num("keys_moved"), 4, "missing keys are skipped: {s:?}");
    no_error(&s);
    let mut bc = b.conn();
    assert_same_data(&before, &snap_db(&mut bc), "tag group on the target");
    for k in &group {
        assert_eq!(
            as_int(&ok(&mut ac, &["EXISTS", k])),
            0,
            "{k} left on source"
        );
    }
    assert_eq!(
        slots_count(&mut ac, slot),
        20,
        "other keys of the slot stay"
    );
    assert_eq!(dbsize(&mut ac), 30);
    assert_exact(&mut ac, H);
    assert_exact(&mut bc, H);
}

#[test]
fn key_job_across_slots() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let keys: Vec<String> = (0..200).map(|i| format!("k:{i}")).collect();
    set_many(&mut ac, &keys);
    let chosen: Vec<String> = keys.iter().step_by(3).cloned().collect();
    let id = migrate_keys(&mut ac, b.port, &[], &chosen);
    let s = finish_done(&a, id);
    assert_eq!(s.num("keys_moved") as usize, chosen.len());
    let mut bc = b.conn();
    let on_b: BTreeSet<Vec<u8>> = all_keys(&mut bc).into_iter().collect();
    let want: BTreeSet<Vec<u8>> = chosen.iter().map(|k| k.clone().into_bytes()).collect();
    assert_eq!(on_b, want);
    assert_eq!(dbsize(&mut ac) as usize, 200 - chosen.len());
}

#[test]
fn status_while_running_and_wait_timeout() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let keys = fill_slots(&mut ac, &[40], 30);
    throttle(&mut ac, 10, 0); // >= 2 s for 30 keys
    let id = migrate_slots(&mut ac, b.port, &[], &[40]);
    let s = status(&mut ac, id);
    assert_eq!(s.state(), "running", "{s:?}");
    for f in FIELDS {
        s.get(f);
    }
    // WAIT with a timeout on a running job answers `running` after the timeout.
    let t = Instant::now();
    assert_eq!(wait_job(&mut ac, id, 300), "running");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "WAIT 300 returned after {:?}",
        t.elapsed()
    );
    // Progress is monotonic.
    let mut last_moved = 0;
    let mut last_remaining = i64::MAX;
    let mut last_elapsed = -1;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let s = status(&mut ac, id);
        if s.state() != "running" {
            break;
        }
        let (m, r, e) = (
            s.num("keys_moved"),
            s.num("keys_remaining"),
            s.num("elapsed_ms"),
        );
        assert!(
            m >= last_moved && r <= last_remaining && e >= last_elapsed,
            "progress went back: {s:?}"
        );
        assert!(
            m + r <= keys.len() as i64,
            "moved + remaining > total: {s:?}"
        );
        (last_moved, last_remaining, last_elapsed) = (m, r, e);
        thread::sleep(Duration::from_millis(50));
    }
    throttle(&mut ac, 0, 0);
    let s = finish_done(&a, id);
    assert_eq!(s.num("keys_moved") as usize, keys.len());
}

#[test]
fn wait_blocks_only_the_caller() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    fill_slots(&mut ac, &[41], 20);
    throttle(&mut ac, 4, 0); // >= 4 s for 20 keys
    let id = migrate_slots(&mut ac, b.port, &[], &[41]);
    let returned = Arc::new(AtomicBool::new(false));
    let waiter = {
        let mut wc = a.conn();
        let returned = returned.clone();
        thread::spawn(move || {
            let r = wait_job(&mut wc, id, 0);
            returned.store(true, Ordering::SeqCst);
            r
        })
    };
    thread::sleep(Duration::from_millis(200));
    // Other clients are served while the waiter is blocked.
    let mut oc = a.conn();
    for i in 0..200 {
        ok(&mut oc, &["SET", &format!("other:{i}"), "x"]);
        assert_eq!(as_string(&ok(&mut oc, &["PING"])), "PONG");
    }
    let s = status(&mut oc, id);
    assert_eq!(
        s.state(),
        "running",
        "the throttled job should still run: {s:?}"
    );
    assert!(
        !returned.load(Ordering::SeqCst),
        "WAIT 0 returned while the job was running"
    );
    throttle(&mut oc, 0, 0);
    assert_eq!(waiter.join().unwrap(), "done");
    assert_eq!(status(&mut oc, id).state(), "done");
}

#[test]
fn wait_from_several_clients() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    fill_slots(&mut ac, &[42], 10);
    throttle(&mut ac, 5, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[42]);
    // WAIT id 0, WAIT id (no timeout: forever), WAIT id 60000.
    let waiters: Vec<_> = [Some(0u64), None, Some(60_000)]
        .into_iter()
        .map(|t| {
            let mut wc = a.conn();
            thread::spawn(move || match t {
                Some(t) => wait_job(&mut wc, id, t),
                None => as_string(&ok(
                    &mut wc,
                    &["SLOTS.MIGRATE.WAIT".to_string(), id.to_string()],
                )),
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(100));
    throttle(&mut ac, 0, 0);
    for w in waiters {
        assert_eq!(w.join().unwrap(), "done");
    }
}

/// WAIT with a short timeout, polled in a loop during a long job, and
/// WAITs whose clients disconnect: each blocked client's handle (with a
/// reply buffer of ~16 KB) is released when it times out or goes away, not
/// kept until the job ends. Then a WAIT still gets the job's end.
#[test]
fn wait_timeouts_and_disconnects_release_their_clients() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    fill_slots(&mut ac, &[43], 20);
    throttle(&mut ac, 1, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[43]);
    let used =
        |c: &mut redis::Connection| -> i64 { info(c, "memory")["used_memory"].parse().unwrap() };
    // Warm up allocator caches and the connection.
    for _ in 0..20 {
        assert_eq!(wait_job(&mut ac, id, 1), "running");
    }
    let before = used(&mut ac);
    for _ in 0..400 {
        assert_eq!(wait_job(&mut ac, id, 1), "running");
    }
    for _ in 0..100 {
        let mut wc = a.conn();
        let mut cmd = redis::cmd("SLOTS.MIGRATE.WAIT");
        cmd.arg(id).arg(0);
        wc.send_packed_command(&cmd.get_packed_command()).unwrap();
        drop(wc);
    }
    thread::sleep(Duration::from_millis(200));
    let grown = used(&mut ac) - before;
    assert!(
        grown < 1_000_000,
        "used_memory grew by {grown} bytes over 400 timed-out and 100 dropped WAITs"
    );
    let st = status(&mut ac, id);
    assert_eq!(st.state(), "running", "{st:?}");
    throttle(&mut ac, 0, 0);
    assert_eq!(wait_job(&mut ac, id, 0), "done");
    let e = err_text(
        &run(
            &mut ac,
            &["SLOTS.MIGRATE.WAIT", &id.to_string(), "9223372036854775807"],
        )
        .unwrap_err(),
    );
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn cancel_keeps_unmoved_keys_and_a_new_job_finishes() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slots = [50u32, 51];
    fill_slots(&mut ac, &slots, 40);
    ok(
        &mut ac,
        &["HSET", &format!("{{{}}}:h", tag_for_slot(H, 50)), "f", "v"],
    );
    let before = snap_db(&mut ac);
    throttle(&mut ac, 10, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &slots);
    wait_status(&mut ac, id, "keys_moved >= 5", |s| s.num("keys_moved") >= 5);
    assert_eq!(
        as_string(&ok(&mut ac, &["SLOTS.MIGRATE.CANCEL", &id.to_string()])),
        "OK"
    );
    // CANCEL stops the job at once: checked at the end, after the rest.
    let st_at_cancel = status(&mut ac, id);
    assert_eq!(wait_job(&mut ac, id, 10_000), "cancelled");
    // Nothing moves any more.
    let src1 = snap_db(&mut ac);
    let mut bc = b.conn();
    let dst1 = snap_db(&mut bc);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        snap_db(&mut ac).len(),
        src1.len(),
        "source changed after CANCEL"
    );
    assert_eq!(
        snap_db(&mut bc).len(),
        dst1.len(),
        "target changed after CANCEL"
    );
    assert!(!dst1.is_empty(), "some keys had moved");
    assert!(
        src1.len() < before.len(),
        "moved keys are deleted from the source"
    );
    assert!(
        !src1.is_empty(),
        "a throttled job cannot have moved everything"
    );
    // Every key is somewhere with its content; none is lost.
    let union = union_consistent(&src1, &dst1, "after CANCEL");
    assert_same_data(&before, &union, "source + target after CANCEL");
    // A new job moves the rest.
    throttle(&mut ac, 0, 0);
    let s = migrate_slots_done(&a, &b, &[], &slots);
    assert_eq!(s.num("keys_moved") as usize, src1.len(), "{s:?}");
    assert_same_data(&before, &snap_db(&mut bc), "after the second job");
    assert_eq!(dbsize(&mut ac), 0);
    assert_exact(&mut ac, H);
    assert_exact(&mut bc, H);
    assert_eq!(
        st_at_cancel.state(),
        "cancelled",
        "STATUS right after CANCEL replied OK (the job stops at once): {st_at_cancel:?}"
    );
}

#[test]
fn throttle_keys_per_sec() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let v = ok(
        &mut ac,
        &["CONFIG", "GET", "slots.migrate-max-keys-per-sec"],
    );
    assert_eq!(as_string(&as_array(&v)[1]), "0", "default: unlimited");
    let v = ok(
        &mut ac,
        &["CONFIG", "GET", "slots.migrate-max-bytes-per-sec"],
    );
    assert_eq!(as_string(&as_array(&v)[1]), "0", "default: unlimited");
    let keys = fill_slots(&mut ac, &[60], 50);
    throttle(&mut ac, 20, 0);
    let t = Instant::now();
    let id = migrate_slots(&mut ac, b.port, &[], &[60]);
    let s = finish_done(&a, id);
    let took = t.elapsed();
    assert_eq!(s.num("keys_moved") as usize, keys.len());
    // 50 keys at 20 keys/s: at least (50 - 20) / 20 s even with a 1 s burst.
    assert!(
        took >= Duration::from_millis(1400),
        "50 keys at 20 keys/s took {took:?}"
    );
    assert!(s.num("elapsed_ms") >= 1400, "{s:?}");
}

#[test]
fn throttle_bytes_per_sec() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let tag = tag_for_slot(H, 61);
    for i in 0..10 {
        ok(
            &mut ac,
            &[
                b"SET".to_vec(),
                format!("{{{tag}}}:{i}").into_bytes(),
                noise(i, 50_000),
            ],
        );
    }
    throttle(&mut ac, 0, 200_000);
    let t = Instant::now();
    let id = migrate_slots(&mut ac, b.port, &[], &[61]);
    let s = finish_done(&a, id);
    let took = t.elapsed();
    assert!(s.num("bytes_moved") >= 500_000, "{s:?}");
    // 500 KB at 200 KB/s: at least (500 - 200) / 200 s even with a 1 s burst.
    assert!(
        took >= Duration::from_millis(1400),
        "500 KB at 200 KB/s took {took:?}"
    );
}

#[test]
fn throttle_change_applies_to_running_job() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    fill_slots(&mut ac, &[62], 100);
    throttle(&mut ac, 1, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[62]);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(status(&mut ac, id).state(), "running");
    throttle(&mut ac, 0, 0);
    let s = finish_done(&a, id);
    assert_eq!(s.num("keys_moved"), 100);
}

#[test]
fn finished_jobs_remembered_up_to_sixteen() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    ok(&mut ac, &["SET", "x", "1"]);
    let mut ids = Vec::new();
    for _ in 0..20 {
        // Missing keys only: nothing to do, the job is done at once.
        let id = migrate_keys(&mut ac, b.port, &[], &["nope"]);
        finish_done(&a, id);
        ids.push(id);
    }
    let uniq: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(uniq.len(), 20, "job ids are unique: {ids:?}");
    let all = status_all(&mut ac);
    let listed: BTreeSet<i64> = all.iter().map(|s| s.num("id")).collect();
    assert_eq!(all.len(), 16, "the last 16 finished jobs: {listed:?}");
    let last16: BTreeSet<i64> = ids[4..].iter().copied().collect();
    assert_eq!(listed, last16);
    for s in &all {
        assert_eq!(s.state(), "done");
        assert_eq!(s.num("keys_moved"), 0);
    }
    let e = expect_err(
        &mut ac,
        &["SLOTS.MIGRATE.STATUS".to_string(), ids[0].to_string()],
    );
    assert!(e.starts_with("ERR"), "{e}");
}

#[test]
fn bad_arguments_are_rejected_and_start_nothing() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let p = b.port.to_string();
    let bad: Vec<Vec<&str>> = vec![
        vec!["SLOTS.MIGRATE"],
        vec!["SLOTS.MIGRATE", "127.0.0.1"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "SLOTS"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "1"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "SLOTS", "1024"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "SLOTS", "-1"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "SLOTS", "x"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "SLOTS", "1", "abc"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", "notaport", "SLOTS", "1"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", "70000", "SLOTS", "1"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", "-5", "SLOTS", "1"],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "FOO", "1", "SLOTS", "1"],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "MAXBULKS",
            "0",
            "SLOTS",
            "1",
        ],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "MAXBULKS",
            "-1",
            "SLOTS",
            "1",
        ],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "MAXBULKS",
            "many",
            "SLOTS",
            "1",
        ],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "MAXBYTES",
            "0",
            "SLOTS",
            "1",
        ],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "TIMEOUT",
            "soon",
            "SLOTS",
            "1",
        ],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "TIMEOUT",
            "-1",
            "SLOTS",
            "1",
        ],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "PARALLEL",
            "0",
            "SLOTS",
            "1",
        ],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "PARALLEL",
            "x",
            "SLOTS",
            "1",
        ],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "AUTH", "SLOTS", "1"],
        vec![
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &p,
            "AUTH2",
            "user",
            "SLOTS",
            "1",
        ],
        vec!["SLOTS.MIGRATE", "127.0.0.1", &p, "MAXBULKS", "SLOTS", "1"],
        vec!["SLOTS.MIGRATE.KEYS", "127.0.0.1", &p],
        vec!["SLOTS.MIGRATE.KEYS", "127.0.0.1", &p, "KEYS"],
        vec!["SLOTS.MIGRATE.KEYS", "127.0.0.1", &p, "a"],
        vec!["SLOTS.MIGRATE.KEYS", "127.0.0.1", &p, "BOGUS", "KEYS", "a"],
        vec!["SLOTS.MIGRATE.STATUS", "x"],
        vec!["SLOTS.MIGRATE.STATUS", "999999"],
        vec!["SLOTS.MIGRATE.STATUS", "1", "2"],
        vec!["SLOTS.MIGRATE.WAIT"],
        vec!["SLOTS.MIGRATE.WAIT", "x"],
        vec!["SLOTS.MIGRATE.WAIT", "999999"],
        vec!["SLOTS.MIGRATE.WAIT", "999999", "100"],
        vec!["SLOTS.MIGRATE.CANCEL"],
        vec!["SLOTS.MIGRATE.CANCEL", "x"],
        vec!["SLOTS.MIGRATE.CANCEL", "999999"],
        vec!["CONFIG", "SET", "slots.migrate-max-keys-per-sec", "-1"],
        vec!["CONFIG", "SET", "slots.migrate-max-bytes-per-sec", "lots"],
    ];
    ok(&mut ac, &["SET", "{t}a", "1"]);
    for args in &bad {
        let e = expect_err(&mut ac, args);
        assert!(!e.is_empty(), "{args:?}");
    }
    assert_eq!(
        status_all(&mut ac).len(),
        0,
        "no job may have been created by a rejected command"
    );
    assert_eq!(dbsize(&mut ac), 1);
    // WAIT with a bad timeout on a real job.
    let id = migrate_keys(&mut ac, b.port, &[], &["{t}a"]);
    finish_done(&a, id);
    expect_err(
        &mut ac,
        &[
            "SLOTS.MIGRATE.WAIT".to_string(),
            id.to_string(),
            "soon".into(),
        ],
    );
    expect_err(
        &mut ac,
        &[
            "SLOTS.MIGRATE.WAIT".to_string(),
            id.to_string(),
            "-1".into(),
        ],
    );
}

#[test]
fn crc16_slot_range() {
    let a = Server::builder().crc16().start();
    let b = Server::builder().crc16().start();
    let mut ac = a.conn();
    ok(&mut ac, &["SET", "foo", "1"]); // slot 12182
    let e = expect_err(
        &mut ac,
        &[
            "SLOTS.MIGRATE",
            "127.0.0.1",
            &b.port.to_string(),
            "SLOTS",
            "16384",
        ],
    );
    assert!(e.starts_with("ERR"), "{e}");
    let s = migrate_slots_done(&a, &b, &[], &[16383, 12182]);
    assert_eq!(s.get("slots"), "12182,16383");
    assert_eq!(s.num("keys_moved"), 1);
}

/// The throttle applies to all jobs together.
#[test]
fn throttle_is_shared_by_all_jobs() {
    let a = Server::start();
    let b = Server::start();
    let c = Server::start();
    let mut ac = a.conn();
    fill_slots(&mut ac, &[70], 30);
    fill_slots(&mut ac, &[71], 30);
    throttle(&mut ac, 20, 0);
    let t = Instant::now();
    let j1 = migrate_slots(&mut ac, b.port, &[], &[70]);
    let j2 = migrate_slots(&mut ac, c.port, &[], &[71]);
    finish_done(&a, j1);
    finish_done(&a, j2);
    let took = t.elapsed();
    // 60 keys at 20 keys/s for both jobs together: at least (60 - 20) / 20 s.
    assert!(
        took >= Duration::from_millis(1900),
        "two jobs, 60 keys, 20 keys/s in total took {took:?}"
    );
}

/// PARALLEL n opens n connections to the target (1 by default).
#[test]
fn parallel_opens_that_many_connections() {
    for (opts, n) in [(&["PARALLEL", "3"][..], 3usize), (&[][..], 1)] {
        let a = Server::start();
        let b = Server::start();
        let mut ac = a.conn();
        fill_slots(&mut ac, &[72], 40);
        throttle(&mut ac, 4, 0);
        let id = migrate_slots(&mut ac, b.port, opts, &[72]);
        wait_status(&mut ac, id, "6 keys moved", |s| s.num("keys_moved") >= 6);
        let mut bc = b.conn();
        let list = as_string(&ok(&mut bc, &["CLIENT", "LIST"]));
        let others = list.lines().filter(|l| !l.contains("cmd=client")).count();
        assert_eq!(others, n, "{opts:?}: connections to the target:\n{list}");
        throttle(&mut ac, 0, 0);
        finish_done(&a, id);
    }
}

/// The connect timeout: a target address that does not answer.
#[test]
fn connect_timeout() {
    let a = Server::start();
    let mut ac = a.conn();
    fill_slots(&mut ac, &[73], 5);
    let d0 = digest(&mut ac);
    let t = Instant::now();
    let v = run(
        &mut ac,
        &[
            "SLOTS.MIGRATE",
            "10.255.255.1",
            "6379",
            "TIMEOUT",
            "500",
            "SLOTS",
            "73",
        ],
    );
    match v {
        Ok(redis::Value::Int(id)) => {
            let s = finish(&a, id);
            assert_eq!(s.state(), "failed", "{s:?}");
            assert!(!s.get("last_error").is_empty(), "{s:?}");
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "TIMEOUT 500 bounds the connect: {:?}",
                t.elapsed()
            );
        }
        other => panic!("SLOTS.MIGRATE must start a job (the failure shows in STATUS): {other:?}"),
    }
    assert_eq!(digest(&mut ac), d0);
}

/// MODULE UNLOAD is refused while a job runs (background work pending); the
/// job goes on.
#[test]
fn module_unload_refused_while_a_job_runs() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let keys = fill_slots(&mut ac, &[74], 20);
    throttle(&mut ac, 5, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[74]);
    let e = expect_err(&mut ac, &["MODULE", "UNLOAD", "slots"]);
    assert!(e.starts_with("ERR"), "{e}");
    throttle(&mut ac, 0, 0);
    let s = finish_done(&a, id);
    assert_eq!(s.num("keys_moved") as usize, keys.len());
}

/// While clients are paused for writes (CLIENT PAUSE WRITE, as FAILOVER
/// does), the job deletes nothing on the source (no write reaches the
/// replication stream), as the server's own expiry and eviction; it goes on
/// after the pause.
/// While writes are paused, acknowledged keys wait for their delete and
/// count as moved (-ASK). The job must not send them again meanwhile: a
/// client following -ASK may already have written the target's copy, and
/// a second RESTORE ... REPLACE of the source's older value would undo it.
#[test]
fn acknowledged_keys_are_not_resent_while_their_delete_waits() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let keys = fill_slots(&mut ac, &[77], 60);
    throttle(&mut ac, 100, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[77]);
    wait_status(&mut ac, id, "3 keys moved", |s| s.num("keys_moved") >= 3);
    ok(&mut ac, &["CLIENT", "PAUSE", "3000", "WRITE"]);
    // A key acknowledged but not deleted: the source answers -ASK for it.
    let moved = keys
        .iter()
        .find(|k| {
            matches!(
                redis::cmd("GET").arg(k.as_str()).query::<Option<String>>(&mut ac),
                Err(e) if e.kind() == redis::ErrorKind::Ask
            )
        })
        .expect("an acknowledged key answered with -ASK")
        .clone();
    ok(&mut bc, &["SET", &moved, "written-on-the-target"]);
    // Long enough for every key to be sent and acknowledged, and for the
    // slot walk to come back to the slot (it used to send them all again).
    thread::sleep(Duration::from_millis(2000));
    let during = status(&mut ac, id);
    ok(&mut ac, &["CLIENT", "UNPAUSE"]);
    throttle(&mut ac, 0, 0);
    let s = finish_done(&a, id);
    assert_eq!(s.num("keys_moved") as usize, keys.len(), "{s:?}");
    assert!(
        during.num("keys_moved") as usize <= keys.len(),
        "keys counted as moved twice during the pause: {during:?}"
    );
    let v: Option<String> = redis::cmd("GET").arg(&moved).query(&mut bc).unwrap();
    assert_eq!(
        v.as_deref(),
        Some("written-on-the-target"),
        "the target's write to {moved} was overwritten by a second copy"
    );
    assert_eq!(dbsize(&mut ac), 0);
}

#[test]
fn no_deletes_while_writes_are_paused() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let keys = fill_slots(&mut ac, &[75], 30);
    throttle(&mut ac, 10, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[75]);
    wait_status(&mut ac, id, "3 keys moved", |s| s.num("keys_moved") >= 3);
    ok(&mut ac, &["CLIENT", "PAUSE", "1500", "WRITE"]);
    let off0 = info(&mut ac, "replication")["master_repl_offset"].clone();
    let n0 = dbsize(&mut ac);
    thread::sleep(Duration::from_millis(1000));
    let off1 = info(&mut ac, "replication")["master_repl_offset"].clone();
    let n1 = dbsize(&mut ac);
    ok(&mut ac, &["CLIENT", "UNPAUSE"]);
    throttle(&mut ac, 0, 0);
    let s = finish_done(&a, id);
    assert_eq!(s.num("keys_moved") as usize, keys.len());
    assert_eq!(
        n1, n0,
        "keys deleted on the source during CLIENT PAUSE WRITE"
    );
    assert_eq!(
        off1, off0,
        "replication offset moved during CLIENT PAUSE WRITE"
    );
}
