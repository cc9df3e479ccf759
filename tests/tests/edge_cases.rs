//! Less common situations: loading the module at runtime, blocked SLOTS.KEYS
//! in counts-only mode, server configs that change code paths, SLOTS.DEL
//! racing a full sync, transactions and scripts.

use std::io::Write;
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn slot(k: &str) -> u32 {
    H.slot(k.as_bytes())
}

fn blocked_clients(c: &mut redis::Connection) -> u64 {
    info(c, "clients")["blocked_clients"].parse().unwrap()
}

#[test]
fn module_load_at_runtime_indexes_existing_keys() {
    for args in [
        vec![],
        vec!["index-mode", "counts-only"],
        vec!["hash-function", "crc16"],
    ] {
        let mut s = Server::builder().without_module().start();
        let mut c = s.conn();
        ok(&mut c, &["DEBUG", "POPULATE", "5000", "pre", "4"]);
        let mut c2 = s.conn_db(2);
        set_many(&mut c2, &tagged_keys("two", 30));
        let mut load = vec![
            "MODULE".to_string(),
            "LOAD".into(),
            module_path().display().to_string(),
        ];
        load.extend(args.iter().map(|a| a.to_string()));
        ok(&mut c, &load);
        let hash = if args.contains(&"crc16") {
            HashFn::Crc16
        } else {
            H
        };
        // In full mode the index is built in the background after the load;
        // INFO shows the progress and SLOTS.* commands wait for the end.
        wait_until(
            Duration::from_secs(30),
            "index built after MODULE LOAD",
            || slots_info_num(&mut c, "slots_index_building") == 0,
        );
        assert_eq!(
            slots_info_num(&mut c, "slots_keys_indexed"),
            5030,
            "{args:?}"
        );
        assert_exact_dbs(&mut c, hash, &[0, 2]);
        ok(&mut c, &["DEL", "pre:1"]);
        ok(&mut c2, &["SET", "{two}:x", "1"]);
        assert_exact_dbs(&mut c, hash, &[0, 2]);
        // Unloading is either refused or leaves a working server behind.
        let r = run(&mut c, &["MODULE", "UNLOAD", "slots"]);
        s.assert_alive(&format!("MODULE UNLOAD slots -> {r:?}"));
        ok(&mut c, &["SET", "after-unload", "1"]);
        ok(&mut c, &["DEL", "pre:2"]);
        sleep(Duration::from_millis(50));
        s.assert_alive("writes after MODULE UNLOAD");
        if r.is_err() {
            check(&mut c);
        }
    }
}

/// A counts-only server with a keyspace big enough that SLOTS.KEYS has to
/// walk it over many cron ticks.
fn big_counts_only() -> Server {
    let s = Server::builder()
        .counts_only()
        .module_arg("step-budget-us", "50")
        .start();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "POPULATE", "60000", "big", "1"]);
    s
}

/// Start `SLOTS.KEYS slot count` on its own connection in a thread.
fn spawn_keys(
    s: &Server,
    slot: u32,
    count: u64,
) -> std::thread::JoinHandle<redis::RedisResult<redis::Value>> {
    let mut c = s.conn();
    std::thread::spawn(move || {
        redis::cmd("SLOTS.KEYS")
            .arg(slot)
            .arg(count)
            .query::<redis::Value>(&mut c)
    })
}

#[test]
fn counts_only_slots_keys_concurrent_clients() {
    let s = big_counts_only();
    let mut c = s.conn();
    let want: Vec<u32> = vec![0, 500, 1023];
    let handles: Vec<_> = want
        .iter()
        .map(|&sl| spawn_keys(&s, sl, 1_000_000))
        .collect();
    // Other clients are served while the walks run.
    let t = Instant::now();
    let _: String = redis::cmd("PING").query(&mut c).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    for (h, &sl) in handles.into_iter().zip(&want) {
        let v = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("SLOTS.KEYS {sl}: {e}"));
        let keys: Vec<Vec<u8>> = as_array(&v).iter().map(as_bytes).collect();
        assert!(keys.iter().all(|k| H.slot(k) == sl));
        assert_eq!(
            keys.len() as u64,
            slots_count(&mut c, sl),
            "SLOTS.KEYS {sl} returns the whole slot"
        );
        let set: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(set.len(), keys.len(), "no duplicates");
    }
    assert_eq!(blocked_clients(&mut c), 0);
}

#[test]
fn counts_only_slots_keys_in_multi_and_lua() {
    let mut s = Server::builder().counts_only().start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("ml", 20));
    let ms = slot("ml");
    // A blocking command cannot block inside MULTI or a script: it must either
    // answer directly or return an error; never crash or hang.
    let mut p = redis::pipe();
    p.atomic().cmd("SLOTS.KEYS").arg(ms).arg(100).cmd("PING");
    let r = p.query::<redis::Value>(&mut c);
    s.assert_alive(&format!("SLOTS.KEYS in MULTI -> {r:?}"));
    if let Ok(v) = &r {
        let a = as_array(v);
        if let redis::Value::Array(keys) = &a[0] {
            assert_eq!(keys.len(), 20, "SLOTS.KEYS inside MULTI");
        }
    }
    let r = run(
        &mut c,
        &[
            "EVAL",
            "return redis.call('SLOTS.KEYS', ARGV[1], 100)",
            "0",
            &ms.to_string(),
        ],
    );
    s.assert_alive(&format!("SLOTS.KEYS in Lua -> {r:?}"));
    if let Ok(v) = &r {
        assert_eq!(as_array(v).len(), 20, "SLOTS.KEYS inside Lua");
    }
    sleep(Duration::from_millis(100));
    s.assert_alive("after SLOTS.KEYS in MULTI/Lua");
    // The connection is still usable and in sync.
    let _: String = redis::cmd("PING").query(&mut c).unwrap();
    assert_eq!(slots_keys(&mut c, ms, 100).len(), 20);
    // And the scan-based SLOTS.SCAN from Lua.
    let r = run(
        &mut c,
        &[
            "EVAL",
            "return redis.call('SLOTS.SCAN', ARGV[1], 0, 'COUNT', 1000)",
            "0",
            &ms.to_string(),
        ],
    );
    s.assert_alive(&format!("SLOTS.SCAN in Lua -> {r:?}"));
}

#[test]
fn counts_only_slots_keys_client_goes_away() {
    let mut s = big_counts_only();
    let mut c = s.conn();
    // Disconnect while blocked.
    let mut raw = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    raw.write_all(b"*3\r\n$10\r\nSLOTS.KEYS\r\n$1\r\n7\r\n$7\r\n1000000\r\n")
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "client blocked in SLOTS.KEYS",
        || blocked_clients(&mut c) >= 1,
    );
    drop(raw);
    // CLIENT KILL while blocked.
    let mut k = s.conn();
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut k).unwrap();
    let h = std::thread::spawn(move || {
        redis::cmd("SLOTS.KEYS")
            .arg(8)
            .arg(1_000_000)
            .query::<redis::Value>(&mut k)
    });
    wait_until(Duration::from_secs(5), "second client blocked", || {
        blocked_clients(&mut c) >= 1
    });
    let _ = run(&mut c, &["CLIENT", "KILL", "ID", &id.to_string()]);
    let _ = h.join();
    // CLIENT UNBLOCK while blocked.
    let mut u = s.conn();
    let uid: i64 = redis::cmd("CLIENT").arg("ID").query(&mut u).unwrap();
    let h = std::thread::spawn(move || {
        redis::cmd("SLOTS.KEYS")
            .arg(9)
            .arg(1_000_000)
            .query::<redis::Value>(&mut u)
    });
    wait_until(Duration::from_secs(5), "third client blocked", || {
        blocked_clients(&mut c) >= 1
    });
    let _ = run(&mut c, &["CLIENT", "UNBLOCK", &uid.to_string()]);
    let r = h.join().unwrap();
    assert!(
        r.is_ok() || !r.as_ref().unwrap_err().is_io_error(),
        "CLIENT UNBLOCK -> {r:?}"
    );
    // Let the walks finish and answer their (gone) clients.
    wait_until(Duration::from_secs(30), "all walks done", || {
        blocked_clients(&mut c) == 0
    });
    sleep(Duration::from_millis(300));
    s.assert_alive("SLOTS.KEYS clients gone while blocked");
    check(&mut c);
}

#[test]
fn counts_only_slots_keys_during_flush_swapdb_reload() {
    let mut s = big_counts_only();
    let mut c = s.conn();
    for action in [
        vec!["SWAPDB", "0", "1"],
        vec!["DEBUG", "RELOAD"],
        vec!["FLUSHALL", "ASYNC"],
        vec!["FLUSHALL"],
    ] {
        if dbsize(&mut c) == 0 {
            ok(&mut c, &["DEBUG", "POPULATE", "60000", "big", "1"]);
        }
        let h = spawn_keys(&s, 3, 1_000_000);
        wait_until(Duration::from_secs(5), "client blocked", || {
            blocked_clients(&mut c) >= 1
        });
        ok(&mut c, &action);
        let r = h.join().unwrap();
        s.assert_alive(&format!("{action:?} while SLOTS.KEYS is walking"));
        let v = r.unwrap_or_else(|e| panic!("SLOTS.KEYS during {action:?}: {e}"));
        assert!(as_array(&v).iter().all(|k| H.slot(&as_bytes(k)) == 3));
        check(&mut c);
    }
}

#[test]
fn lazyfree_everywhere() {
    let s = Server::builder()
        .config("lazyfree-lazy-eviction yes")
        .config("lazyfree-lazy-expire yes")
        .config("lazyfree-lazy-server-del yes")
        .config("lazyfree-lazy-user-del yes")
        .config("lazyfree-lazy-user-flush yes")
        .config("replica-lazy-flush yes")
        .start();
    let mut c = s.conn();
    // Values big enough to be freed in the background.
    for i in 0..200 {
        let members: Vec<String> = (0..100).map(|j| j.to_string()).collect();
        let mut a = vec!["SADD".to_string(), format!("{{lz{}}}:{i}", i % 7)];
        a.extend(members);
        ok(&mut c, &a);
    }
    for i in 0..50 {
        ok(&mut c, &["DEL".to_string(), format!("{{lz{}}}:{i}", i % 7)]);
    }
    for i in 50..80 {
        ok(
            &mut c,
            &[
                "RENAME".to_string(),
                format!("{{lz{}}}:{i}", i % 7),
                format!("{{lz{}}}:{}", (i + 1) % 7, i + 200),
            ],
        );
    }
    for i in 80..120 {
        ok(
            &mut c,
            &[
                "PEXPIRE".to_string(),
                format!("{{lz{}}}:{i}", i % 7),
                "5".into(),
            ],
        );
    }
    ok(&mut c, &["SET", "{lz0}:over", "x"]);
    ok(&mut c, &["SADD", "{lz0}:over2", "x"]);
    ok(&mut c, &["RENAME", "{lz0}:over2", "{lz0}:150"]); // overwrite a big set
    wait_until(Duration::from_secs(10), "expiry", || dbsize(&mut c) <= 152);
    ok(&mut c, &["SLOTS.DEL".to_string(), slot("lz3").to_string()]);
    wait_del_done(&mut c);
    assert_exact(&mut c, H);
    ok(&mut c, &["FLUSHALL"]);
    assert_eq!(slots_info(&mut c).len(), 0);
    check(&mut c);
}

#[test]
fn user_keyspace_notifications_enabled() {
    let s = Server::builder()
        .config("notify-keyspace-events KEA")
        .start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("n", 100));
    ok(&mut c, &["DEL", "{n}:1"]);
    ok(&mut c, &["RENAME", "{n}:2", "{m}:2"]);
    ok(&mut c, &["SET", "{n}:3", "v", "PX", "1"]);
    sleep(Duration::from_millis(20));
    all_keys(&mut c);
    assert_eq!(slots_count(&mut c, slot("n")), 97);
    assert_exact(&mut c, H);
}

#[test]
fn many_databases() {
    let s = Server::builder().config("databases 1000").start();
    let mut c = s.conn_db(999);
    set_many(&mut c, &tagged_keys("hi", 10));
    assert_eq!(slots_count(&mut c, slot("hi")), 10);
    ok(&mut c, &["SWAPDB", "0", "999"]);
    assert_eq!(slots_count(&mut c, slot("hi")), 0);
    let mut c0 = s.conn();
    assert_eq!(slots_count(&mut c0, slot("hi")), 10);
    ok(&mut c0, &["MOVE", "{hi}:0", "500"]);
    ok(&mut c0, &["COPY", "{hi}:1", "{hi}:1", "DB", "998"]);
    assert_exact_dbs(&mut c0, H, &[0, 500, 998, 999]);
    ok(&mut c0, &["DEBUG", "RELOAD"]);
    assert_exact_dbs(&mut c0, H, &[0, 500, 998, 999]);
    assert_eq!(slots_info_num(&mut c0, "slots_keys_indexed"), 11);
}

#[test]
fn slots_del_racing_a_full_sync() {
    let p = Server::builder().config("repl-diskless-sync no").start();
    let mut pc = p.conn();
    set_many(&mut pc, &tagged_keys("race", 30_000));
    set_many(&mut pc, &tagged_keys("stay", 100));
    ok(&mut pc, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    ok(
        &mut pc,
        &["SLOTS.DEL".to_string(), slot("race").to_string()],
    );
    // The replica connects while the deletion is running.
    let r = Server::builder().replica_of(&p).start();
    wait_del_done(&mut pc);
    wait_replica_sync(&p, &r);
    let mut rc = r.conn();
    assert_eq!(slots_count(&mut rc, slot("race")), 0);
    assert_eq!(slots_info(&mut rc), slots_info(&mut pc));
    assert_eq!(dbsize(&mut rc), 100);
    assert_exact(&mut rc, H);
}

#[test]
fn slots_del_from_multi_and_lua() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("mx", 50));
    set_many(&mut c, &tagged_keys("lx", 50));
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SET")
        .arg("{mx}:new")
        .arg("1")
        .cmd("SLOTS.DEL")
        .arg(slot("mx"));
    let v: redis::Value = p.query(&mut c).unwrap();
    let a = as_array(&v);
    let e = as_array(&as_array(&a[1])[0]);
    assert_eq!(
        as_int(&e[1]),
        51,
        "SLOTS.DEL inside MULTI sees the earlier SET"
    );
    ok(
        &mut c,
        &[
            "EVAL",
            "return redis.call('SLOTS.DEL', ARGV[1])",
            "0",
            &slot("lx").to_string(),
        ],
    );
    wait_del_done(&mut c);
    assert_eq!(dbsize(&mut c), 0);
    check(&mut c);
}

#[test]
fn slots_del_touches_watched_keys() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("w", 10));
    let mut w = s.conn();
    ok(&mut w, &["WATCH", "{w}:3"]);
    ok(&mut c, &["SLOTS.DEL".to_string(), slot("w").to_string()]);
    wait_del_done(&mut c);
    ok(&mut w, &["MULTI"]);
    ok(&mut w, &["SET", "other", "1"]);
    let r: redis::Value = redis::cmd("EXEC").query(&mut w).unwrap();
    assert_eq!(
        r,
        redis::Value::Nil,
        "EXEC must abort: a watched key was deleted by SLOTS.DEL"
    );
}

#[test]
fn index_memory_is_released() {
    let s = Server::start();
    let mut c = s.conn();
    let empty = slots_info_num(&mut c, "slots_index_bytes");
    set_many(
        &mut c,
        &(0..50_000).map(|i| format!("mem:{i}")).collect::<Vec<_>>(),
    );
    let full = slots_info_num(&mut c, "slots_index_bytes");
    assert!(
        full > empty + 50_000 * 8,
        "index of 50k keys should take memory: {empty} -> {full}"
    );
    ok(&mut c, &["FLUSHALL"]);
    wait_until(
        Duration::from_secs(10),
        "index memory released after FLUSHALL",
        || slots_info_num(&mut c, "slots_index_bytes") < full / 4,
    );
}

/// Background deletion is a write, so it stops while writes are paused
/// (CLIENT PAUSE WRITE is what FAILOVER uses to let replicas catch up; Redis
/// pauses expiry and eviction then, and asserts that nothing is propagated).
#[test]
fn slots_del_waits_during_client_pause_write() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("pz", 30_000));
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    ok(&mut c, &["SLOTS.DEL".to_string(), slot("pz").to_string()]);
    ok(&mut c, &["CLIENT", "PAUSE", "1000", "WRITE"]);
    let before = dbsize(&mut c);
    let off1 = info(&mut c, "replication")["master_repl_offset"].clone();
    sleep(Duration::from_millis(300));
    let after = dbsize(&mut c);
    let off2 = info(&mut c, "replication")["master_repl_offset"].clone();
    ok(&mut c, &["CLIENT", "UNPAUSE"]);
    wait_del_done(&mut c);
    assert_eq!(dbsize(&mut c), 0);
    assert_eq!(
        (before, off1),
        (after, off2),
        "SLOTS.DEL kept deleting (and propagating) while writes were paused"
    );
}
