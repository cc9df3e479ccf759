//! A replica (also running the module) must end up with the same index.

use std::collections::BTreeMap;
use std::time::Duration;

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn infos(s: &Server, dbs: &[i64]) -> Vec<BTreeMap<u32, u64>> {
    dbs.iter()
        .map(|&db| slots_info(&mut s.conn_db(db)))
        .collect()
}

fn assert_same(p: &Server, r: &Server, dbs: &[i64], when: &str) {
    let pi = infos(p, dbs);
    let ri = infos(r, dbs);
    for (i, db) in dbs.iter().enumerate() {
        assert!(
            pi[i] == ri[i],
            "{when}: db {db}: replica SLOTS.INFO differs from primary (primary sum {}, replica sum {})\n{}",
            pi[i].values().sum::<u64>(),
            ri[i].values().sum::<u64>(),
            diff_counts(&pi[i], &ri[i])
        );
        let mut rc = r.conn_db(*db);
        assert_eq!(
            ri[i].values().sum::<u64>(),
            dbsize(&mut rc),
            "{when}: db {db}: replica sum vs DBSIZE"
        );
        assert_model(&mut rc, H);
    }
    check(&mut r.conn());
    check(&mut p.conn());
}

fn populate(c: &mut redis::Connection) {
    for db in [0i64, 2] {
        ok(c, &["SELECT".to_string(), db.to_string()]);
        set_many(
            c,
            &(0..3000).map(|i| format!("r{db}:{i}")).collect::<Vec<_>>(),
        );
        set_many(c, &tagged_keys("rep", 100));
        ok(c, &["RPUSH", "{rl}l", "a"]);
    }
    ok(c, &["SELECT", "0"]);
}

fn mutate(c: &mut redis::Connection) {
    let mut del = vec!["DEL".to_string()];
    del.extend((0..500).map(|i| format!("r0:{i}")));
    ok(c, &del);
    ok(c, &["UNLINK", "{rep}:1", "{rep}:2"]);
    ok(c, &["RENAME", "{rep}:3", "{moved}:3"]);
    ok(c, &["MOVE", "{rep}:4", "2"]);
    ok(c, &["COPY", "{rep}:5", "{copy}:5", "DB", "3"]);
    ok(c, &["LPOP", "{rl}l"]);
    ok(c, &["HSET", "{h}h", "f", "v"]);
    ok(c, &["HDEL", "{h}h", "f"]);
    ok(c, &["SET", "{exp}a", "v", "PX", "1"]);
    ok(c, &["EXPIRE", "{rep}:6", "-1"]);
    ok(
        c,
        &[
            "EVAL",
            "redis.call('SET', KEYS[1], 1); redis.call('DEL', KEYS[2]); return 1",
            "2",
            "{lua}x",
            "{rep}:7",
        ],
    );
    ok(c, &["SELECT", "2"]);
    ok(c, &["FLUSHDB"]);
    ok(c, &["SET", "{rep}:after-flush", "1"]);
    ok(c, &["SELECT", "0"]);
    ok(c, &["SWAPDB", "2", "3"]);
    // Let the 1 ms key expire on the primary (the replica then gets a DEL),
    // so no expiry is in flight while primary and replica are compared.
    wait_until(
        Duration::from_secs(10),
        "{exp}a to expire on the primary",
        || as_int(&ok(c, &["EXISTS", "{exp}a"])) == 0,
    );
}

#[test]
fn full_resync_then_stream() {
    let p = Server::start();
    let mut pc = p.conn();
    populate(&mut pc);
    let r = Server::builder().replica_of(&p).start();
    wait_replica_sync(&p, &r);
    assert_same(&p, &r, &[0, 2], "after full sync");

    mutate(&mut pc);
    wait_replica_sync(&p, &r);
    assert_same(
        &p,
        &r,
        &[0, 2, 3],
        "after writes and deletes on the primary",
    );
}

#[test]
fn resync_after_replica_restart() {
    let p = Server::start();
    let mut pc = p.conn();
    populate(&mut pc);
    let mut r = Server::builder().replica_of(&p).start();
    wait_replica_sync(&p, &r);
    // Replica restarts from scratch (kill, no RDB): full resync into a server
    // that has just loaded nothing.
    r.restart(Stop::Kill);
    mutate(&mut pc);
    wait_replica_sync(&p, &r);
    assert_same(&p, &r, &[0, 2, 3], "after replica restart");
    // And with an RDB of its own (which is then replaced by the primary's).
    r.restart(Stop::ShutdownSave);
    ok(&mut pc, &["FLUSHALL"]);
    set_many(&mut pc, &tagged_keys("fresh", 50));
    wait_replica_sync(&p, &r);
    assert_same(&p, &r, &[0, 2, 3], "after replica restart with stale RDB");
}

#[test]
fn replicaof_switch_flushes_old_data() {
    let p = Server::start();
    let mut pc = p.conn();
    set_many(&mut pc, &tagged_keys("primary", 20));
    // A server with its own data becomes a replica: its data is replaced.
    let r = Server::start();
    let mut rc = r.conn();
    set_many(&mut rc, &tagged_keys("mine", 500));
    ok(&mut rc, &["REPLICAOF", "127.0.0.1", &p.port.to_string()]);
    wait_replica_sync(&p, &r);
    let mut rc = r.conn();
    assert_eq!(slots_count(&mut rc, H.slot(b"mine")), 0);
    assert_eq!(slots_count(&mut rc, H.slot(b"primary")), 20);
    assert_same(&p, &r, &[0], "after REPLICAOF");
    // Promote it and write.
    ok(&mut rc, &["REPLICAOF", "NO", "ONE"]);
    ok(&mut rc, &["DEL", "{primary}:0"]);
    ok(&mut rc, &["SET", "{mine}:x", "1"]);
    assert_exact(&mut rc, H);
}

#[test]
fn diskless_sync_swapdb_load() {
    let p = Server::builder()
        .config("repl-diskless-sync yes")
        .config("repl-diskless-sync-delay 0")
        .start();
    let mut pc = p.conn();
    populate(&mut pc);
    let r = Server::builder()
        .config("repl-diskless-load swapdb")
        .replica_of(&p)
        .start();
    wait_replica_sync(&p, &r);
    assert_same(&p, &r, &[0, 2], "after diskless swapdb load");
    mutate(&mut pc);
    wait_replica_sync(&p, &r);
    assert_same(&p, &r, &[0, 2, 3], "after more writes");
}

#[test]
fn diskless_sync_on_empty_db_load() {
    let p = Server::builder()
        .config("repl-diskless-sync yes")
        .config("repl-diskless-sync-delay 0")
        .start();
    let mut pc = p.conn();
    populate(&mut pc);
    let r = Server::builder()
        .config("repl-diskless-load on-empty-db")
        .replica_of(&p)
        .start();
    wait_replica_sync(&p, &r);
    assert_same(&p, &r, &[0, 2], "after diskless on-empty-db load");
}

#[test]
fn replica_does_not_expire_but_follows_primary() {
    let p = Server::start();
    let mut pc = p.conn();
    let r = Server::builder().replica_of(&p).start();
    wait_replica_sync(&p, &r);
    ok(&mut pc, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    let mut pipe = redis::pipe();
    for i in 0..20 {
        pipe.cmd("SET")
            .arg(format!("{{rx}}:{i}"))
            .arg("v")
            .arg("PX")
            .arg(30)
            .ignore();
    }
    let _: () = pipe.query(&mut pc).unwrap();
    wait_replica_sync(&p, &r);
    std::thread::sleep(Duration::from_millis(100));
    let mut rc = r.conn();
    // Reading on the replica hides the key but does not delete it.
    let _: Option<String> = redis::cmd("GET").arg("{rx}:0").query(&mut rc).unwrap();
    check(&mut rc);
    assert_eq!(slots_count(&mut rc, H.slot(b"rx")), dbsize(&mut rc));
    // The primary reclaims them (SCAN touches each) and replicates DELs.
    all_keys(&mut pc);
    wait_replica_sync(&p, &r);
    assert_eq!(dbsize(&mut rc), 0);
    assert_eq!(slots_count(&mut rc, H.slot(b"rx")), 0);
    check(&mut rc);
}

/// While a replica loads asynchronously (`repl-diskless-load swapdb`, a full
/// resync from the master it already followed) it keeps serving its old
/// dataset, but the slots index already waits for the new one: SLOTS.*
/// commands that read the index answer -LOADING instead of counting an
/// empty index; after the load they answer for the new dataset. (Without
/// the module declaring that it copes, the server would not load
/// asynchronously at all.)
#[test]
fn async_load_answers_loading_not_an_empty_index() {
    let p = Server::builder()
        .config("repl-diskless-sync yes")
        .config("repl-diskless-sync-delay 0")
        .config("repl-backlog-size 16384")
        .start();
    let mut pc = p.conn();
    set_many(&mut pc, &tagged_keys(&tag_for_slot(H, 91), 10));
    let r = Server::builder()
        .config("repl-diskless-load swapdb")
        // Serve clients every KB of the load, not every 2 MB.
        .config("loading-process-events-interval-bytes 1024")
        .replica_of(&p)
        .start();
    wait_replica_sync(&p, &r);
    let mut rc = r.conn();
    assert_eq!(slots_count(&mut rc, 91), 10);
    // Cut the link and write more than the backlog holds: the replica
    // comes back with a full resync from the same master, loaded
    // asynchronously, slowly (200 us per key).
    ok(&mut rc, &["CONFIG", "SET", "key-load-delay", "200"]);
    // One transaction, so the replica cannot reconnect in between.
    let mut tx = redis::pipe();
    tx.atomic()
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .ignore();
    for k in tagged_keys(&tag_for_slot(H, 90), 20_000) {
        tx.cmd("SET").arg(k).arg("v").ignore();
    }
    let _: () = tx.query(&mut pc).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while info(&mut rc, "persistence")
        .get("async_loading")
        .map(String::as_str)
        != Some("1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no asynchronous load seen\n{}",
            r.log_tail(20)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let e = err_text(&run(&mut rc, &["SLOTS.COUNT", "91"]).unwrap_err());
    assert!(e.starts_with("LOADING"), "{e}");
    assert_eq!(dbsize(&mut rc), 10, "the old dataset is still served");
    ok(&mut rc, &["CONFIG", "SET", "key-load-delay", "0"]);
    wait_replica_sync(&p, &r);
    assert_eq!(slots_count(&mut rc, 90), 20_000);
    assert_eq!(slots_count(&mut rc, 91), 10);
    assert_exact(&mut rc, H);
}
