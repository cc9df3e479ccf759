//! Failures during async migration (MIGRATION.md): target down, killed,
//! slow, out of memory, authentication, source killed. In every case no key
//! is lost: each key of the dataset is on the source or on the target (equal
//! content where on both), and a new job finishes the move.

use std::thread;
use std::time::Duration;

use slotfork_tests::migrate::*;
use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

/// 2 slots x `n` small keys, a hash and a big (chunked with MAXBULKS 100) set.
fn dataset(c: &mut redis::Connection, slots: &[u32], n: usize) -> DbSnap {
    for &s in slots {
        let t = tag_for_slot(H, s);
        set_many(c, &tagged_keys(&t, n));
        ok(c, &["HSET", &format!("{{{t}}}:h"), "a", "1", "b", "2"]);
        fill_big(c, &format!("{{{t}}}:bigset"), "set", 5000);
    }
    snap_db(c)
}

fn assert_nothing_lost(before: &DbSnap, src: &Server, dst: &Server, ctx: &str) -> DbSnap {
    let s = snap_db(&mut src.conn());
    let d = snap_db(&mut dst.conn());
    let u = union_consistent(&s, &d, ctx);
    assert_same_data(before, &u, ctx);
    s
}

/// Keeps the target busy (`DEBUG SLEEP secs`) on a thread of its own: it
/// answers nothing meanwhile, and batches already sent wait in its socket.
fn hold_target(b: &Server, secs: &str) -> thread::JoinHandle<()> {
    let mut bc = b.conn();
    let secs = secs.to_string();
    thread::spawn(move || {
        let _ = run(&mut bc, &["DEBUG", "SLEEP", secs.as_str()]);
    })
}

fn error_mentions(s: &Status, words: &[&str]) {
    let e = s.get("last_error").to_lowercase();
    assert!(
        words.iter().any(|w| e.contains(&w.to_lowercase())),
        "last_error should explain the failure (one of {words:?}): {s:?}"
    );
    assert!(s.num("errors") >= 1, "errors counter: {s:?}");
}

#[test]
fn target_down_before_start() {
    let a = Server::start();
    let mut ac = a.conn();
    let before = dataset(&mut ac, &[300, 301], 20);
    let d0 = digest(&mut ac);
    let port = unused_port();
    let id = migrate_slots(&mut ac, port, &["TIMEOUT", "2000"], &[300, 301]);
    let s = finish(&a, id);
    assert_eq!(s.state(), "failed", "{s:?}");
    error_mentions(&s, &["connect", "refused", &port.to_string()]);
    assert_eq!(s.num("keys_moved"), 0);
    assert_eq!(
        digest(&mut ac),
        d0,
        "source dataset changed by a failed job"
    );
    assert_same_data(&before, &snap_db(&mut ac), "source after a failed job");
    // Clients of the slots are served normally once the job has failed.
    let t = tag_for_slot(H, 300);
    assert_eq!(
        as_string(&ok(&mut ac, &["GET", &format!("{{{t}}}:0")])),
        "v"
    );
    ok(&mut ac, &["SET", &format!("{{{t}}}:0"), "w"]);
}

#[test]
fn target_killed_mid_job_then_rerun() {
    let a = Server::start();
    let mut b = Server::builder()
        .appendonly(true)
        .config("appendfsync always")
        .start();
    let mut ac = a.conn();
    let slots = [310u32, 311];
    let before = dataset(&mut ac, &slots, 60);
    throttle(&mut ac, 20, 0);
    let id = migrate_slots(
        &mut ac,
        b.port,
        &["TIMEOUT", "2000", "MAXBULKS", "100"],
        &slots,
    );
    wait_status(&mut ac, id, "20 keys moved", |s| s.num("keys_moved") >= 20);
    kill9(&b);
    let s = finish(&a, id);
    assert_eq!(s.state(), "failed", "{s:?}");
    assert!(
        !s.get("last_error").is_empty() && s.get("last_error") != "-",
        "{s:?}"
    );
    // Start the target again: it reloads its AOF.
    b.restart(Stop::Kill);
    let src_left = assert_nothing_lost(&before, &a, &b, "after the target was killed");
    assert!(
        src_left.len() < before.len(),
        "some keys had moved before the kill"
    );
    throttle(&mut ac, 0, 0);
    let s = migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &slots);
    assert_eq!(s.num("errors"), 0, "{s:?}");
    let mut bc = b.conn();
    assert_same_data(&before, &snap_db(&mut bc), "target after the re-run");
    assert_eq!(user_keys(&mut ac).len(), 0);
    assert_exact(&mut ac, H);
    assert_exact(&mut bc, H);
}

#[test]
fn target_slower_than_timeout() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slots = [312u32];
    let before = dataset(&mut ac, &slots, 40);
    throttle(&mut ac, 20, 0);
    let id = migrate_slots(&mut ac, b.port, &["TIMEOUT", "500"], &slots);
    wait_status(&mut ac, id, "5 keys moved", |s| s.num("keys_moved") >= 5);
    // The target stops answering for 3 s, longer than TIMEOUT.
    let sleeper = hold_target(&b, "3");
    let s = finish(&a, id);
    sleeper.join().unwrap();
    assert_eq!(s.state(), "failed", "{s:?}");
    error_mentions(&s, &["timeout", "timed out"]);
    assert_nothing_lost(&before, &a, &b, "after a timeout");
    throttle(&mut ac, 0, 0);
    migrate_slots_done(&a, &b, &[], &slots);
    assert_same_data(&before, &snap_db(&mut b.conn()), "after the re-run");
    assert_eq!(user_keys(&mut ac).len(), 0);
}

#[test]
fn target_out_of_memory() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = 320;
    let t = tag_for_slot(H, slot);
    for i in 0..100 {
        ok(
            &mut ac,
            &[
                "SET",
                &format!("{{{t}}}:{i}"),
                &format!("{i}:{}", "m".repeat(50_000)),
            ],
        );
    }
    fill_big(&mut ac, &format!("{{{t}}}:bighash"), "hash", 50_000);
    let before = snap_db(&mut ac);
    let used: u64 = info(&mut bc, "memory")["used_memory"].parse().unwrap();
    let limit = used + 1_000_000;
    ok(
        &mut bc,
        &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
    );
    ok(&mut bc, &["CONFIG", "SET", "maxmemory", &limit.to_string()]);
    let id = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &[slot]);
    let s = finish(&a, id);
    assert_eq!(
        s.state(),
        "failed",
        "the target cannot hold 5 MB under a 1 MB margin: {s:?}"
    );
    error_mentions(&s, &["OOM", "memory"]);
    let src = assert_nothing_lost(&before, &a, &b, "after OOM on the target");
    assert!(
        !src.is_empty(),
        "the source keeps the keys the target refused"
    );
    // Unacknowledged keys are still on the source, acknowledged ones are on the target.
    let on_target = snap_db(&mut bc);
    for k in before.keys() {
        assert!(
            src.contains_key(k) || on_target.contains_key(k),
            "{} lost",
            show(k)
        );
    }
    assert!(
        as_int(&ok(&mut bc, &["EXISTS", &format!("{{{t}}}:bighash")])) == 0
            || on_target.contains_key(format!("{{{t}}}:bighash").as_bytes()),
    );
    // With memory again, a new job finishes.
    ok(&mut bc, &["CONFIG", "SET", "maxmemory", "0"]);
    migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &[slot]);
    assert_same_data(&before, &snap_db(&mut bc), "after the re-run");
    assert_eq!(user_keys(&mut ac).len(), 0);
}

#[test]
fn restore_on_oom_target_answers_oom_and_changes_nothing() {
    let b = Server::start();
    let helper = Server::builder().without_module().start();
    let mut hc = helper.conn();
    ok(&mut hc, &["SET", "k", "v"]);
    let p = dump(&mut hc, "k");
    let mut bc = b.conn();
    fill_big(&mut bc, "filler", "hash", 20_000);
    ok(
        &mut bc,
        &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
    );
    ok(&mut bc, &["CONFIG", "SET", "maxmemory", "1"]);
    let d0 = digest(&mut bc);
    let r = run(
        &mut bc,
        &restore_args(
            "1",
            "oomtest",
            &[rec(&[b"DUMP", b"k", b"0", b"-", b"0", &p])],
        ),
    );
    match r {
        Err(e) => assert!(err_text(&e).starts_with("OOM"), "{}", err_text(&e)),
        Ok(v) => panic!("SLOTS.RESTORE over maxmemory must answer -OOM, got {v:?}"),
    }
    assert_eq!(digest(&mut bc), d0);
    ok(&mut bc, &["CONFIG", "SET", "maxmemory", "0"]);
}

#[test]
fn auth_with_requirepass() {
    let a = Server::start();
    let b = Server::start();
    let mut bc = b.conn();
    ok(&mut bc, &["CONFIG", "SET", "requirepass", "s3cret"]);
    let mut ac = a.conn();
    let before = dataset(&mut ac, &[330], 20);
    let s = migrate_slots_done(&a, &b, &["AUTH", "s3cret", "MAXBULKS", "100"], &[330]);
    assert_eq!(s.num("errors"), 0);
    let mut bc = conn_auth(&b, None, "s3cret");
    assert_same_data(&before, &snap_db(&mut bc), "target with requirepass");
    assert_eq!(user_keys(&mut ac).len(), 0);
}

#[test]
fn auth2_with_acl_user() {
    let a = Server::start();
    let b = Server::start();
    let mut bc = b.conn();
    ok(
        &mut bc,
        &[
            "ACL", "SETUSER", "migrator", "on", ">m1gr4te", "~*", "&*", "+@all",
        ],
    );
    ok(&mut bc, &["ACL", "SETUSER", "default", "off"]);
    let mut ac = a.conn();
    let before = dataset(&mut ac, &[331], 20);
    let s = migrate_slots_done(
        &a,
        &b,
        &["AUTH2", "migrator", "m1gr4te", "MAXBULKS", "100"],
        &[331],
    );
    assert_eq!(s.num("errors"), 0);
    let mut bc = conn_auth(&b, Some("migrator"), "m1gr4te");
    assert_same_data(&before, &snap_db(&mut bc), "target with an ACL user");
    assert_eq!(user_keys(&mut ac).len(), 0);
}

#[test]
fn wrong_credentials_fail_the_job_and_keep_everything() {
    let a = Server::start();
    let b = Server::start();
    let mut bc = b.conn();
    ok(
        &mut bc,
        &[
            "ACL", "SETUSER", "migrator", "on", ">right", "~*", "&*", "+@all",
        ],
    );
    ok(&mut bc, &["CONFIG", "SET", "requirepass", "alsoright"]);
    let mut ac = a.conn();
    let before = dataset(&mut ac, &[332], 10);
    let d0 = digest(&mut ac);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["AUTH", "wrong"], vec!["WRONGPASS", "auth", "password"]),
        (
            vec!["AUTH2", "migrator", "wrong"],
            vec!["WRONGPASS", "auth", "password"],
        ),
        (
            vec!["AUTH2", "nosuchuser", "right"],
            vec!["WRONGPASS", "auth", "password"],
        ),
        (vec![], vec!["NOAUTH", "auth"]),
    ];
    for (opts, words) in cases {
        let mut o = opts.clone();
        o.extend(["TIMEOUT", "2000"]);
        let id = migrate_slots(&mut ac, b.port, &o, &[332]);
        let s = finish(&a, id);
        assert_eq!(s.state(), "failed", "{opts:?}: {s:?}");
        error_mentions(&s, &words);
        assert_eq!(s.num("keys_moved"), 0, "{s:?}");
        assert_eq!(digest(&mut ac), d0, "{opts:?}: source changed");
    }
    let mut bc = conn_auth(&b, None, "alsoright");
    assert_eq!(dbsize(&mut bc), 0, "nothing reached the target");
    assert_same_data(&before, &snap_db(&mut ac), "source");
}

#[test]
fn source_killed_mid_job_then_new_job_resumes() {
    let mut a = Server::builder()
        .appendonly(true)
        .config("appendfsync always")
        .start();
    let b = Server::start();
    let mut ac = a.conn();
    let slots = [340u32, 341];
    let before = dataset(&mut ac, &slots, 80);
    throttle(&mut ac, 30, 0);
    let id = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &slots);
    wait_status(&mut ac, id, "30 keys moved", |s| s.num("keys_moved") >= 30);
    drop(ac);
    a.restart(Stop::Kill);
    let mut ac = a.conn();
    let src = assert_nothing_lost(
        &before,
        &a,
        &b,
        "after the source was killed and reloaded its AOF",
    );
    assert!(
        src.len() < before.len() && !src.is_empty(),
        "{} of {}",
        src.len(),
        before.len()
    );
    assert_exact(&mut ac, H);
    // The job is gone with the process; the throttle is back at its default.
    let s = migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &slots);
    assert_eq!(s.num("keys_moved") as usize, src.len(), "{s:?}");
    let mut bc = b.conn();
    assert_same_data(&before, &snap_db(&mut bc), "target after the new job");
    assert_eq!(user_keys(&mut ac).len(), 0);
    assert_exact(&mut ac, H);
    assert_exact(&mut bc, H);
}

#[test]
fn staging_key_lost_mid_transfer_is_resent() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = 350;
    let t = tag_for_slot(H, slot);
    let key = format!("{{{t}}}:bighash");
    fill_big(&mut ac, &key, "hash", 100_000);
    let before = snap_db(&mut ac);
    throttle(&mut ac, 0, 400_000);
    let id = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &[slot]);
    let mut staging = Vec::new();
    wait_until(LONG, "staging key on the target", || {
        match staging_keys(&mut bc).into_iter().next() {
            Some(s) => {
                staging = s;
                true
            }
            None => false,
        }
    });
    // The staging key disappears (as after an expiry or a target restart):
    // the target answers -1 to the next chunk and the source starts over.
    thread::sleep(Duration::from_millis(300));
    ok(&mut bc, &[b"DEL".as_slice(), &staging]);
    throttle(&mut ac, 0, 0);
    let s = finish_done(&a, id);
    assert!(
        s.num("keys_resent") >= 1,
        "the big key was sent again: {s:?}"
    );
    assert_same_data(
        &before,
        &snap_db(&mut bc),
        "big key after a restart from offset 0",
    );
    assert_eq!(dbsize(&mut ac), 0);
    assert!(staging_keys(&mut bc).is_empty());
}

#[test]
fn target_without_the_module() {
    let a = Server::start();
    let b = Server::builder().without_module().start();
    let mut ac = a.conn();
    let before = dataset(&mut ac, &[360], 10);
    let id = migrate_slots(&mut ac, b.port, &["TIMEOUT", "2000"], &[360]);
    let s = finish(&a, id);
    assert_eq!(s.state(), "failed", "{s:?}");
    error_mentions(&s, &["unknown command", "SLOTS.RESTORE"]);
    assert_same_data(&before, &snap_db(&mut ac), "source");
    assert_eq!(dbsize(&mut b.conn()), 0);
}

#[test]
fn target_is_a_read_only_replica() {
    let a = Server::start();
    let p = Server::start();
    let r = Server::builder().replica_of(&p).start();
    wait_replica_sync(&p, &r);
    let mut ac = a.conn();
    let before = dataset(&mut ac, &[361], 10);
    let id = migrate_slots(&mut ac, r.port, &["TIMEOUT", "2000"], &[361]);
    let s = finish(&a, id);
    assert_eq!(s.state(), "failed", "{s:?}");
    error_mentions(&s, &["READONLY", "read only", "replica"]);
    assert_same_data(&before, &snap_db(&mut ac), "source");
    assert_eq!(dbsize(&mut r.conn()), 0);
}

#[test]
fn unresolvable_target_host() {
    let a = Server::start();
    let mut ac = a.conn();
    let before = dataset(&mut ac, &[362], 5);
    let v = run(
        &mut ac,
        &[
            "SLOTS.MIGRATE",
            "no-such-host.invalid",
            "6379",
            "TIMEOUT",
            "2000",
            "SLOTS",
            "362",
        ],
    );
    match v {
        Err(e) => assert!(err_text(&e).starts_with("ERR"), "{}", err_text(&e)),
        Ok(redis::Value::Int(id)) => {
            let s = finish(&a, id);
            assert_eq!(s.state(), "failed", "{s:?}");
            assert!(!s.get("last_error").is_empty(), "{s:?}");
        }
        Ok(v) => panic!("unexpected reply {v:?}"),
    }
    assert_same_data(&before, &snap_db(&mut ac), "source");
}

/// Migrating to the server itself must not lose the keys (restore, then
/// delete the "moved" copy would). Refusing it, or failing the job, are fine.
#[test]
fn migrating_to_itself_loses_nothing() {
    let a = Server::start();
    let mut ac = a.conn();
    let before = dataset(&mut ac, &[363], 10);
    match try_migrate_slots(&mut ac, a.port, &["TIMEOUT", "2000"], &[363]) {
        Err(e) => eprintln!("refused: {}", err_text(&e)),
        Ok(redis::Value::Int(id)) => {
            let st = wait_job(&mut ac, id, 5_000);
            let s = status(&mut ac, id);
            if st == "running" {
                // Stop it so that the data check below sees a quiet server.
                let _ = run(&mut ac, &["SLOTS.MIGRATE.CANCEL", &id.to_string()]);
                let _ = wait_job(&mut ac, id, 10_000);
            }
            assert_ne!(
                st, "running",
                "a job to the server itself must be refused or fail, not run forever: {s:?}"
            );
        }
        Ok(v) => panic!("unexpected reply {v:?}"),
    }
    assert_same_data(&before, &snap_db(&mut ac), "source after a job to itself");
}

/// SWAPDB while replies to batches in flight wait to be taken: they
/// acknowledge keys of the dataset that is now in the other database. The
/// job must fail without deleting anything: the same names in the dataset
/// swapped in (database 1's keys, here with other values) are not the keys
/// the target received.
#[test]
fn swapdb_mid_job_deletes_nothing_of_the_swapped_in_dataset() {
    let a = Server::start();
    let b = Server::start();
    let slot = 560u32;
    let keys = tagged_keys(&tag_for_slot(H, slot), 12000);
    let mut a0 = a.conn();
    let mut a1 = a.conn_db(1);
    set_many(&mut a0, &keys);
    let mut p = redis::pipe();
    for k in &keys {
        p.cmd("SET").arg(k).arg("db1").ignore();
    }
    let _: () = p.query(&mut a1).unwrap();
    let before0 = snap_db(&mut a0);
    let before1 = snap_db(&mut a1);
    let id = migrate_slots(&mut a0, b.port, &[], &[slot]);
    wait_status(&mut a0, id, "some keys moved", |s| {
        s.num("keys_moved") >= 500
    });
    // The source's main thread sleeps inside the transaction while the
    // replies to the batches in flight arrive on the connection threads;
    // the job takes them after the swap.
    let r: Vec<redis::Value> = redis::pipe()
        .atomic()
        .cmd("DEBUG")
        .arg("SLEEP")
        .arg("0.2")
        .cmd("SWAPDB")
        .arg(0)
        .arg(1)
        .query(&mut a0)
        .unwrap();
    assert_eq!(r.len(), 2, "{r:?}");
    let s = finish(&a, id);
    assert_eq!(s.state(), "failed", "{s:?}");
    error_mentions(&s, &["SWAPDB"]);
    assert_same_data(
        &before1,
        &snap_db(&mut a0),
        "database 1's keys, now in database 0, untouched",
    );
    let u = union_consistent(&snap_db(&mut a1), &snap_db(&mut b.conn()), "db 1 + target");
    assert_same_data(
        &before0,
        &u,
        "the job's dataset: on the source or the target",
    );
    check(&mut a0);
}

fn exists(c: &mut redis::Connection, k: &str) -> bool {
    redis::cmd("EXISTS").arg(k).query::<i64>(c).unwrap() == 1
}

/// Starts a job on `slot` (TIMEOUT 300 ms) and, once some keys have moved,
/// holds the target for a second: the job fails on the timeout while its
/// batches in flight are applied when the target wakes up. Returns the
/// failed job's status.
fn fail_with_batches_in_flight(a: &Server, b: &Server, slot: u32) -> Status {
    let mut ac = a.conn();
    let id = migrate_slots(&mut ac, b.port, &["TIMEOUT", "300"], &[slot]);
    wait_status(&mut ac, id, "some keys moved", |s| {
        s.num("keys_moved") >= 100
    });
    let sleeper = hold_target(b, "1");
    let s = finish(a, id);
    sleeper.join().unwrap();
    assert_eq!(s.state(), "failed", "{s:?}");
    s
}

/// Keys whose batch reached the target but whose acknowledgement never
/// came back (the job timed out while the target was busy) may exist on
/// both servers. If they are deleted on the source before the next job,
/// that job must delete the target's copies: it takes over the failed
/// job's unacknowledged keys and sends DEL for those gone here. Otherwise
/// they would come back once the slot has moved.
#[test]
fn keys_deleted_after_a_failed_job_do_not_come_back() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slot = 314u32;
    let keys = tagged_keys(&tag_for_slot(H, slot), 3000);
    set_many(&mut ac, &keys);
    let s = fail_with_batches_in_flight(&a, &b, slot);
    let left = info(&mut ac, "slots")
        .get("slots_migrate_leftover_keys")
        .cloned()
        .unwrap_or_default();
    assert_ne!(left, "0", "unacknowledged keys are remembered");
    let here: Vec<String> = keys
        .iter()
        .filter(|k| exists(&mut ac, k))
        .cloned()
        .collect();
    assert!(!here.is_empty(), "{s:?}");
    let moved: std::collections::BTreeSet<&String> =
        keys.iter().filter(|k| !here.contains(k)).collect();
    // The application deletes what is left here, then the slot moves.
    for k in &here {
        ok(&mut ac, &["DEL", k]);
    }
    migrate_slots_done(&a, &b, &[], &[slot]);
    let mut bc = b.conn();
    let on_target: std::collections::BTreeSet<&String> =
        keys.iter().filter(|k| exists(&mut bc, k)).collect();
    assert_eq!(
        on_target.difference(&moved).count(),
        0,
        "keys deleted on the source came back on the target"
    );
    assert_eq!(on_target, moved);
    assert_eq!(
        info(&mut ac, "slots")["slots_migrate_leftover_keys"],
        "0",
        "leftovers taken over by the second job"
    );
}

/// CANCEL with batches in flight: the target applies them after the cancel,
/// and the job's last batch deletes those copies again, so every key is on
/// exactly one server (the moved ones on the target, the rest here).
#[test]
fn cancel_with_batches_in_flight_leaves_no_copies() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slot = 316u32;
    let keys = tagged_keys(&tag_for_slot(H, slot), 3000);
    set_many(&mut ac, &keys);
    let before = snap_db(&mut ac);
    let id = migrate_slots(&mut ac, b.port, &[], &[slot]);
    wait_status(&mut ac, id, "some keys moved", |s| {
        s.num("keys_moved") >= 100
    });
    let sleeper = hold_target(&b, "0.5");
    thread::sleep(Duration::from_millis(100));
    assert!(status(&mut ac, id).num("keys_in_flight") > 0);
    ok(&mut ac, &["SLOTS.MIGRATE.CANCEL", &id.to_string()]);
    assert_eq!(finish(&a, id).state(), "cancelled");
    // Until the target has applied the cancelled job's batches, a new job
    // could be overtaken by them (an older copy or a DEL applied after
    // its own copy): refused meanwhile.
    let e = err_text(&try_migrate_slots(&mut ac, b.port, &[], &[slot]).unwrap_err());
    assert!(e.contains("still delivering"), "{e}");
    sleeper.join().unwrap();
    // Let the target apply the batches and the cancel's last one.
    thread::sleep(Duration::from_millis(300));
    let src = snap_db(&mut ac);
    let dst = snap_db(&mut b.conn());
    for k in src.keys() {
        assert!(!dst.contains_key(k), "{} is on both servers", show(k));
    }
    let u = union_consistent(&src, &dst, "after CANCEL");
    assert_same_data(&before, &u, "source + target after CANCEL");
    migrate_slots_done(&a, &b, &[], &[slot]);
    assert_same_data(&before, &snap_db(&mut b.conn()), "after the next job");
}

/// Leftovers name the target by its run id, not by how the job spelled it,
/// and a key moved by any later job is no longer one: after a failed job to
/// 127.0.0.1, a job to `localhost` (the same server) moves the slot; a third
/// job to 127.0.0.1 covering that slot must not delete any of those keys on
/// the target (they are the keys now, not stale copies).
#[test]
fn leftovers_follow_the_target_not_its_spelling() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slot = 318u32;
    let keys = tagged_keys(&tag_for_slot(H, slot), 3000);
    set_many(&mut ac, &keys);
    let before = snap_db(&mut ac);
    fail_with_batches_in_flight(&a, &b, slot);
    assert_ne!(info(&mut ac, "slots")["slots_migrate_leftover_keys"], "0");
    let port = b.port.to_string();
    let id2 = as_int(&ok(
        &mut ac,
        &[
            "SLOTS.MIGRATE",
            "localhost",
            &port,
            "SLOTS",
            &slot.to_string(),
        ],
    ));
    finish_done(&a, id2);
    assert_eq!(info(&mut ac, "slots")["slots_migrate_leftover_keys"], "0");
    let late = format!("{{{}}}:late", tag_for_slot(H, slot));
    ok(&mut ac, &["SET", &late, "1"]);
    migrate_slots_done(&a, &b, &[], &[slot]);
    let after = snap_db(&mut b.conn());
    assert_eq!(after.len(), keys.len() + 1);
    let mut want = before.clone();
    want.extend(snap_keys(&mut b.conn(), &[late]));
    assert_same_data(&want, &after, "target after three jobs");
}
