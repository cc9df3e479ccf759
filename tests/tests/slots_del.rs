//! SLOTS.DEL: background deletion of whole slots.

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn slot(k: &str) -> u32 {
    H.slot(k.as_bytes())
}

/// SLOTS.DEL reply as (slot, keys_queued) pairs.
fn slots_del(c: &mut redis::Connection, slots: &[u32]) -> Vec<(u32, u64)> {
    let mut a = vec!["SLOTS.DEL".to_string()];
    a.extend(slots.iter().map(|s| s.to_string()));
    let v = ok(c, &a);
    as_array(&v)
        .iter()
        .map(|e| {
            let p = as_array(e);
            assert_eq!(
                p.len(),
                2,
                "SLOTS.DEL entry must be [slot, keys_queued]: {v:?}"
            );
            (as_int(&p[0]) as u32, as_int(&p[1]) as u64)
        })
        .collect()
}

#[test]
fn deletes_whole_slots_only() {
    let s = Server::start();
    let mut c = s.conn();
    let a = tagged_keys("dela", 30);
    let b = tagged_keys("delb", 70);
    let keep = tagged_keys("keep", 40);
    set_many(&mut c, &a);
    set_many(&mut c, &b);
    set_many(&mut c, &keep);
    // Plain keys that happen to hash to slot(dela) are deleted too.
    let plain = plain_keys_in_slot(H, slot("dela"), "plain", 5);
    set_many(&mut c, &plain);
    ok(&mut c, &["HSET", "{dela}hash", "f", "v"]);
    ok(&mut c, &["SET", "{dela}ttl", "v", "EX", "1000"]);
    // Same slot in another db is not touched.
    let mut c1 = s.conn_db(1);
    set_many(&mut c1, &a);

    let deleted_before = slots_info_num(&mut c, "slots_del_deleted_keys");
    let r = slots_del(&mut c, &[slot("dela"), slot("delb")]);
    assert_eq!(r, vec![(slot("dela"), 37), (slot("delb"), 70)]);
    wait_del_done(&mut c);
    assert_eq!(slots_count(&mut c, slot("dela")), 0);
    assert_eq!(slots_count(&mut c, slot("delb")), 0);
    assert_eq!(slots_count(&mut c, slot("keep")), 40);
    for k in a.iter().chain(&b).chain(&plain) {
        assert_eq!(
            as_int(&ok(&mut c, &["EXISTS", k])),
            0,
            "{k} should be deleted"
        );
    }
    assert_eq!(dbsize(&mut c), 40);
    assert_eq!(slots_count(&mut c1, slot("dela")), 30, "db 1 untouched");
    assert_eq!(
        slots_info_num(&mut c, "slots_del_deleted_keys") - deleted_before,
        107
    );
    assert_eq!(slots_info_num(&mut c, "slots_del_pending_keys"), 0);
    assert!(slots_info_entries(&mut c).iter().all(|e| !e.deleting));
    assert_exact_dbs(&mut c, H, &[0, 1]);
}

#[test]
fn empty_and_repeated_slots() {
    let s = Server::start();
    let mut c = s.conn();
    assert_eq!(slots_del(&mut c, &[7]), vec![(7, 0)]);
    assert_eq!(slots_info_num(&mut c, "slots_del_pending_slots"), 0);
    set_many(&mut c, &tagged_keys("rep", 10));
    let rs = slot("rep");
    let r = slots_del(&mut c, &[rs, rs]);
    assert_eq!(r.len(), 2, "one entry per argument");
    assert_eq!(r[0], (rs, 10));
    wait_del_done(&mut c);
    assert_eq!(slots_count(&mut c, rs), 0);
    assert_eq!(dbsize(&mut c), 0);
    check(&mut c);
    // Once more while the first is pending.
    set_many(&mut c, &tagged_keys("rep", 2000));
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    slots_del(&mut c, &[rs]);
    slots_del(&mut c, &[rs]);
    wait_del_done(&mut c);
    assert_eq!(slots_count(&mut c, rs), 0);
    assert_exact(&mut c, H);
}

#[test]
fn large_slot_50k_keys_progress_and_responsiveness() {
    let mut s = Server::start();
    let mut c = s.conn();
    let big = tagged_keys("big", 50_000);
    set_many(&mut c, &big);
    set_many(&mut c, &tagged_keys("small", 100));
    let bs = slot("big");
    assert_eq!(slots_count(&mut c, bs), 50_000);
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "100"]);

    let t0 = Instant::now();
    assert_eq!(slots_del(&mut c, &[bs]), vec![(bs, 50_000)]);
    let reply_time = t0.elapsed();
    assert!(
        reply_time < Duration::from_secs(2),
        "SLOTS.DEL must not delete synchronously ({reply_time:?})"
    );

    // While it runs: marked "deleting", pending fields, PING answers fast.
    let entries = slots_info_entries(&mut c);
    let e = entries.iter().find(|e| e.slot == bs);
    let pending_keys = slots_info_num(&mut c, "slots_del_pending_keys");
    assert!(
        matches!(e, Some(SlotEntry { deleting: true, .. })),
        "slot {bs} should be marked deleting right after SLOTS.DEL with a 100us budget: {e:?}"
    );
    assert_eq!(slots_info_num(&mut c, "slots_del_pending_slots"), 1);
    assert!(
        pending_keys > 0 && pending_keys <= 50_000,
        "slots_del_pending_keys {pending_keys}"
    );
    let e = e.unwrap();
    assert!(
        e.keys <= 50_000 && slots_count(&mut c, bs) <= e.keys,
        "count of a deleting slot is the live count"
    );

    let mut max_ping = Duration::ZERO;
    let mut last_pending = pending_keys;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut polls = 0;
    loop {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query(&mut c).unwrap();
        max_ping = max_ping.max(t.elapsed());
        let i = info(&mut c, "slots");
        let pk: u64 = i["slots_del_pending_keys"].parse().unwrap();
        let ps: u64 = i["slots_del_pending_slots"].parse().unwrap();
        assert!(
            pk <= last_pending,
            "slots_del_pending_keys went up: {last_pending} -> {pk}"
        );
        last_pending = pk;
        polls += 1;
        if ps == 0 {
            assert_eq!(pk, 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SLOTS.DEL of 50k keys did not finish in 60s (pending {pk})"
        );
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        polls > 1,
        "deletion should have been observable in progress"
    );
    assert!(
        max_ping < Duration::from_secs(1),
        "server blocked for {max_ping:?} during SLOTS.DEL"
    );
    assert_eq!(slots_count(&mut c, bs), 0);
    assert_eq!(dbsize(&mut c), 100);
    assert_eq!(slots_info_num(&mut c, "slots_del_deleted_keys"), 50_000);
    assert!(slots_info_entries(&mut c).iter().all(|e| e.slot != bs));
    assert_exact(&mut c, H);
    s.assert_alive("50k SLOTS.DEL");
}

#[test]
fn replica_and_aof_follow_deletion() {
    let mut p = Server::builder()
        .appendonly(true)
        .config("appendfsync always")
        .start();
    let r = Server::builder().replica_of(&p).start();
    let mut pc = p.conn();
    set_many(&mut pc, &tagged_keys("rd", 3000));
    set_many(&mut pc, &tagged_keys("rk", 30));
    wait_replica_sync(&p, &r);
    let mut rc = r.conn();
    assert_eq!(slots_count(&mut rc, slot("rd")), 3000);

    slots_del(&mut pc, &[slot("rd")]);
    wait_del_done(&mut pc);
    wait_replica_sync(&p, &r);
    assert_eq!(
        slots_count(&mut rc, slot("rd")),
        0,
        "replica keeps keys deleted on the primary"
    );
    assert_eq!(dbsize(&mut rc), 30);
    assert_eq!(slots_info(&mut rc), slots_info(&mut pc));
    assert_exact(&mut rc, H);
    // A replica must not run the deletion itself (it would diverge).
    expect_err(&mut rc, &["SLOTS.DEL".to_string(), slot("rk").to_string()]);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(slots_count(&mut rc, slot("rk")), 30);
    drop(rc);
    drop(r);

    // The AOF replays the UNLINKs.
    drop(pc);
    p.restart(Stop::Kill);
    let mut pc = p.conn();
    assert_eq!(slots_count(&mut pc, slot("rd")), 0);
    assert_eq!(dbsize(&mut pc), 30);
    assert_exact(&mut pc, H);
}

#[test]
fn concurrent_changes_during_deletion() {
    let s = Server::start();
    let mut c = s.conn();
    let keys = tagged_keys("cc", 20_000);
    set_many(&mut c, &keys);
    let cs = slot("cc");
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    slots_del(&mut c, &[cs]);
    // While pending: delete some queued keys ourselves, rename some out of the
    // slot, overwrite some, add some new keys to the slot.
    let mut renamed = Vec::new();
    for i in (0..20_000).step_by(997).rev() {
        let k = &keys[i];
        if as_int(&ok(&mut c, &["EXISTS", k])) == 0 {
            continue;
        }
        match i % 4 {
            0 => {
                ok(&mut c, &["DEL", k]);
            }
            1 => {
                let to = format!("{{elsewhere}}:{i}");
                ok(&mut c, &["RENAME", k, &to]);
                renamed.push(to);
            }
            2 => {
                ok(&mut c, &["SET", k, "overwritten"]);
            }
            _ => {
                ok(&mut c, &["SET", &format!("{{cc}}:new{i}"), "v"]);
            }
        }
        check(&mut c);
    }
    wait_del_done(&mut c);
    assert_exact(&mut c, H);
    // Keys moved to another slot are not deleted.
    for k in &renamed {
        assert_eq!(
            as_int(&ok(&mut c, &["EXISTS", k])),
            1,
            "{k} left the slot before deletion"
        );
    }
    assert_eq!(slots_count(&mut c, slot("elsewhere")), renamed.len() as u64);
    // Untouched original keys are all gone (whatever happened to the keys
    // written during the deletion is left to the module).
    let left: BTreeSet<Vec<u8>> = slots_keys(&mut c, cs, 100_000).into_iter().collect();
    for (i, k) in keys.iter().enumerate() {
        if i % 997 != 0 {
            assert!(!left.contains(k.as_bytes()), "{k} survived SLOTS.DEL");
        }
    }
}

#[test]
fn flushall_cancels_pending_deletion() {
    let s = Server::start();
    let mut c = s.conn();
    let keys = tagged_keys("fl", 20_000);
    set_many(&mut c, &keys);
    let fs = slot("fl");
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    slots_del(&mut c, &[fs]);
    ok(&mut c, &["FLUSHALL"]);
    check(&mut c);
    wait_del_done(&mut c);
    assert_eq!(slots_info_num(&mut c, "slots_del_pending_keys"), 0);
    // Keys written after the flush (same names) must not be deleted by a stale job.
    set_many(&mut c, &keys[..500]);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(slots_count(&mut c, fs), 500);
    assert_eq!(dbsize(&mut c), 500);
    assert_exact(&mut c, H);
}

#[test]
fn flushdb_cancels_pending_deletion() {
    let s = Server::start();
    let mut c = s.conn();
    let keys = tagged_keys("fd", 20_000);
    set_many(&mut c, &keys);
    let fs = slot("fd");
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    slots_del(&mut c, &[fs]);
    ok(&mut c, &["FLUSHDB", "ASYNC"]);
    wait_del_done(&mut c);
    set_many(&mut c, &keys[..300]);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(slots_count(&mut c, fs), 300);
    assert_exact(&mut c, H);
}

#[test]
fn swapdb_and_reload_during_deletion() {
    let mut s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("sw", 20_000));
    let mut c1 = s.conn_db(1);
    set_many(&mut c1, &tagged_keys("sw", 100));
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    slots_del(&mut c, &[slot("sw")]);
    ok(&mut c, &["SWAPDB", "0", "1"]);
    check(&mut c);
    wait_del_done(&mut c);
    s.assert_alive("SWAPDB during SLOTS.DEL");
    assert_exact_dbs(&mut c, H, &[0, 1]);

    set_many(&mut c, &tagged_keys("sw", 20_000));
    slots_del(&mut c, &[slot("sw")]);
    ok(&mut c, &["DEBUG", "RELOAD"]);
    check(&mut c);
    wait_del_done(&mut c);
    s.assert_alive("DEBUG RELOAD during SLOTS.DEL");
    assert_exact_dbs(&mut c, H, &[0, 1]);
}

#[test]
fn deletion_in_selected_db() {
    let s = Server::start();
    let mut c0 = s.conn();
    let mut c5 = s.conn_db(5);
    set_many(&mut c0, &tagged_keys("db", 50));
    set_many(&mut c5, &tagged_keys("db", 60));
    assert_eq!(slots_del(&mut c5, &[slot("db")]), vec![(slot("db"), 60)]);
    wait_del_done(&mut c5);
    assert_eq!(slots_count(&mut c5, slot("db")), 0);
    assert_eq!(slots_count(&mut c0, slot("db")), 50);
    assert_exact_dbs(&mut c0, H, &[0, 5]);
}

#[test]
fn slots_del_all_slots_at_once() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "POPULATE", "5000", "all", "4"]);
    set_many(
        &mut c,
        &(0..5000).map(|i| format!("k{i}")).collect::<Vec<_>>(),
    );
    let all: Vec<u32> = (0..1024).collect();
    let r = slots_del(&mut c, &all);
    assert_eq!(r.len(), 1024);
    assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 10_000);
    wait_del_done(&mut c);
    assert_eq!(dbsize(&mut c), 0);
    assert_eq!(slots_info(&mut c).len(), 0);
    check(&mut c);
}

#[test]
fn shutdown_with_pending_deletion() {
    let mut s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("sd", 30_000));
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    slots_del(&mut c, &[slot("sd")]);
    wait_until(Duration::from_secs(20), "some keys deleted", || {
        dbsize(&mut c) < 30_000
    });
    drop(c);
    // The server exits normally and comes back consistent (whether the
    // deletion resumes after a restart is the module's choice).
    s.restart(Stop::ShutdownSave);
    let mut c = s.conn();
    check(&mut c);
    wait_del_done(&mut c);
    assert_exact(&mut c, H);
    let left = slots_count(&mut c, slot("sd"));
    assert!(
        left < 30_000,
        "some keys were deleted before the shutdown ({left} left)"
    );
}

/// FAILOVER while a SLOTS.DEL runs: once the server is a replica (partial
/// resync, no load) the deletion stops; it must not go on deleting keys
/// that its new primary still holds.
#[test]
fn failover_stops_a_running_deletion() {
    let a = Server::start();
    let r = Server::builder().replica_of(&a).start();
    let mut ac = a.conn();
    let keys = tagged_keys(&tag_for_slot(H, 5), 60_000);
    set_many(&mut ac, &keys);
    wait_replica_sync(&a, &r);
    // Slow deletion: 50 us of work per millisecond.
    ok(&mut ac, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    slots_del(&mut ac, &[5]);
    thread::sleep(Duration::from_millis(100));
    assert!(
        slots_info_num(&mut ac, "slots_del_pending_keys") > 0,
        "deletion still running"
    );
    ok(&mut ac, &["FAILOVER", "TIMEOUT", "10000"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while info(&mut ac, "replication").get("role").map(String::as_str) != Some("slave") {
        assert!(Instant::now() < deadline, "FAILOVER did not finish");
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(500));
    wait_replica_sync(&r, &a);
    let mut rc = r.conn();
    assert_eq!(
        dbsize(&mut ac),
        dbsize(&mut rc),
        "the old primary kept deleting as a replica"
    );
    assert_eq!(digest_of(&mut ac), digest_of(&mut rc));
    assert_eq!(slots_info_num(&mut ac, "slots_del_pending_slots"), 0);
}

fn digest_of(c: &mut redis::Connection) -> String {
    as_string(&ok(c, &["DEBUG", "DIGEST"]))
}
