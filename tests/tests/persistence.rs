//! The index after loading data: RDB at start, DEBUG RELOAD, AOF.

use std::collections::BTreeMap;

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

/// Keys in dbs 0, 1 and 9, of several types, some with (long) TTLs.
fn fill(c: &mut redis::Connection) -> Vec<(i64, BTreeMap<u32, u64>)> {
    let mut out = Vec::new();
    for db in [0i64, 1, 9] {
        ok(c, &["SELECT".to_string(), db.to_string()]);
        let keys: Vec<String> = (0..3000).map(|i| format!("p{db}:{i}")).collect();
        set_many(c, &keys);
        set_many(c, &tagged_keys(&format!("tag{db}"), 200));
        ok(c, &["RPUSH", "{l}list", "a", "b"]);
        ok(c, &["HSET", "{h}hash", "f", "v"]);
        ok(c, &["ZADD", "{z}zset", "1", "m"]);
        ok(c, &["SADD", "{s}set", "m"]);
        ok(c, &["XADD", "{x}stream", "*", "f", "v"]);
        ok(c, &["SET", "{t}ttl", "v", "EX", "100000"]);
        ok(c, &["DEL", &format!("p{db}:0"), &format!("p{db}:1")]);
        out.push((db, slots_info(c)));
    }
    ok(c, &["SELECT", "0"]);
    out
}

fn verify(c: &mut redis::Connection, want: &[(i64, BTreeMap<u32, u64>)]) {
    for (db, info) in want {
        ok(c, &["SELECT".to_string(), db.to_string()]);
        let got = slots_info(c);
        assert_eq!(got.len(), info.len(), "db {db}: number of non-empty slots");
        assert!(
            got == *info,
            "db {db}: SLOTS.INFO differs after reload\n{}",
            diff_counts(info, &got)
        );
        assert_exact(c, H);
    }
    ok(c, &["SELECT", "0"]);
    let total: u64 = want.iter().map(|(_, m)| m.values().sum::<u64>()).sum();
    assert_eq!(slots_info_num(c, "slots_keys_indexed"), total);
}

#[test]
fn rdb_load_at_start() {
    let mut s = Server::start();
    let mut c = s.conn();
    let want = fill(&mut c);
    drop(c);
    s.restart(Stop::ShutdownSave);
    let mut c = s.conn();
    verify(&mut c, &want);
    // The index keeps working after the load.
    let t0 = slots_count(&mut c, H.slot(b"tag0"));
    ok(&mut c, &["DEL", "{tag0}:5"]);
    assert_eq!(slots_count(&mut c, H.slot(b"tag0")), t0 - 1);
    ok(&mut c, &["SET", "{tag0}:new", "1"]);
    ok(&mut c, &["SET", "{new}:new", "1"]);
    assert_exact(&mut c, H);
    assert_eq!(slots_count(&mut c, H.slot(b"tag0")), t0);
}

#[test]
fn rdb_load_with_expired_keys() {
    let mut s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("stay", 10));
    let mut p = redis::pipe();
    for i in 0..50 {
        p.cmd("SET")
            .arg(format!("{{go}}:{i}"))
            .arg("v")
            .arg("PX")
            .arg(200)
            .ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    // Save while the keys are alive, then restart after they expired: the
    // loader skips expired keys (primary) or they are reclaimed later.
    ok(&mut c, &["SAVE"]);
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(400));
    s.restart(Stop::Kill);
    let mut c = s.conn();
    check(&mut c);
    all_keys(&mut c);
    assert_eq!(slots_count(&mut c, H.slot(b"go")), 0);
    assert_eq!(slots_count(&mut c, H.slot(b"stay")), 10);
    assert_exact(&mut c, H);
}

#[test]
fn debug_reload() {
    let s = Server::start();
    let mut c = s.conn();
    let want = fill(&mut c);
    let rebuilds_before = slots_info_num(&mut c, "slots_index_rebuilds");
    ok(&mut c, &["DEBUG", "RELOAD"]);
    verify(&mut c, &want);
    let rebuilds_after = slots_info_num(&mut c, "slots_index_rebuilds");
    assert!(
        rebuilds_after >= rebuilds_before,
        "slots_index_rebuilds went backwards"
    );
    // Twice more, with changes in between.
    ok(&mut c, &["FLUSHDB"]);
    ok(&mut c, &["DEBUG", "RELOAD"]);
    ok(&mut c, &["SELECT", "0"]);
    assert_eq!(slots_info(&mut c).len(), 0);
    ok(&mut c, &["SET", "x", "1"]);
    ok(&mut c, &["DEBUG", "RELOAD"]);
    assert_eq!(slots_count(&mut c, H.slot(b"x")), 1);
    assert_exact_dbs(&mut c, H, &[0, 1, 9]);
}

#[test]
fn debug_reload_empty_db() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "RELOAD"]);
    assert_eq!(slots_info(&mut c).len(), 0);
    check(&mut c);
    ok(&mut c, &["SET", "a", "1"]);
    assert_exact(&mut c, H);
}

#[test]
fn aof_load_at_start() {
    let mut s = Server::builder()
        .appendonly(true)
        .config("appendfsync always")
        .start();
    let mut c = s.conn();
    let want = fill(&mut c);
    drop(c);
    // NOSAVE: no RDB is written; the server must come back from the AOF.
    s.restart(Stop::ShutdownNoSave);
    let mut c = s.conn();
    verify(&mut c, &want);
    drop(c);
    // Same after a crash (SIGKILL; appendfsync always keeps every write).
    let mut c = s.conn();
    ok(&mut c, &["SET", "{tag0}:afterrestart", "1"]);
    ok(&mut c, &["DEL", "{tag1}:3"]);
    let want_slot = slots_count(&mut c, H.slot(b"tag0"));
    drop(c);
    s.restart(Stop::Kill);
    let mut c = s.conn();
    assert_eq!(slots_count(&mut c, H.slot(b"tag0")), want_slot);
    assert_exact_dbs(&mut c, H, &[0, 1, 9]);
}

#[test]
fn aof_rewrite_then_load() {
    let mut s = Server::builder().appendonly(true).start();
    let mut c = s.conn();
    let _ = fill(&mut c);
    ok(&mut c, &["BGREWRITEAOF"]);
    wait_until(
        std::time::Duration::from_secs(30),
        "AOF rewrite to finish",
        || {
            let p = info(&mut c, "persistence");
            p["aof_rewrite_in_progress"] == "0" && p["aof_rewrite_scheduled"] == "0"
        },
    );
    // More changes go to the incremental AOF.
    ok(&mut c, &["SELECT", "1"]);
    ok(&mut c, &["FLUSHDB"]);
    ok(&mut c, &["SELECT", "0"]);
    ok(&mut c, &["SET", "{tag0}:extra", "1"]);
    ok(&mut c, &["MOVE", "{tag0}:extra", "1"]);
    ok(&mut c, &["SWAPDB", "0", "9"]);
    let want: Vec<(i64, BTreeMap<u32, u64>)> = [0i64, 1, 9]
        .iter()
        .map(|&db| {
            ok(&mut c, &["SELECT".to_string(), db.to_string()]);
            (db, slots_info(&mut c))
        })
        .collect();
    ok(&mut c, &["SELECT", "0"]);
    drop(c);
    s.restart(Stop::ShutdownNoSave);
    let mut c = s.conn();
    verify(&mut c, &want);
    // DEBUG LOADAOF too.
    ok(&mut c, &["DEBUG", "LOADAOF"]);
    verify(&mut c, &want);
}

#[test]
fn loading_replaces_previous_index() {
    // Keys present before a reload must not survive in the index if the
    // reloaded data does not have them.
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("old", 100));
    ok(&mut c, &["SAVE"]);
    ok(&mut c, &["DEL", "{old}:1", "{old}:2"]);
    set_many(&mut c, &tagged_keys("unsaved", 10));
    // DEBUG RELOAD saves first, so use the RDB we just made: NOSAVE variant.
    ok(&mut c, &["DEBUG", "RELOAD", "NOSAVE"]);
    assert_eq!(slots_count(&mut c, H.slot(b"old")), 100);
    assert_eq!(slots_count(&mut c, H.slot(b"unsaved")), 0);
    assert_exact(&mut c, H);
}
