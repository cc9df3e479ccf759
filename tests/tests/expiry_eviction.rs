//! Keys that go away by themselves: active expiry, lazy expiry, eviction.

use std::thread::sleep;
use std::time::Duration;

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

#[test]
fn active_expiry() {
    let s = Server::start();
    let mut c = s.conn();
    let keep: Vec<String> = (0..50).map(|i| format!("keep:{i}")).collect();
    set_many(&mut c, &keep);
    let mut p = redis::pipe();
    for i in 0..300 {
        let k = if i % 2 == 0 {
            format!("vol:{i}")
        } else {
            format!("{{volt}}:{i}")
        };
        p.cmd("SET")
            .arg(k)
            .arg("v")
            .arg("PX")
            .arg(50 + (i % 5) * 20)
            .ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    assert_eq!(dbsize(&mut c), 350);
    check(&mut c);
    // Active expiry (no client access) must bring the keyspace down to 50.
    wait_until(
        Duration::from_secs(15),
        "active expiry to remove 300 keys",
        || dbsize(&mut c) == 50,
    );
    assert_eq!(slots_info(&mut c).values().sum::<u64>(), 50);
    assert_eq!(
        slots_count(&mut c, H.slot(b"volt")),
        model_counts(&mut c, H)
            .get(&H.slot(b"volt"))
            .copied()
            .unwrap_or(0)
    );
    assert_eq!(slots_info_num(&mut c, "slots_keys_indexed"), 50);
    assert_exact(&mut c, H);
}

#[test]
fn active_expiry_in_other_db() {
    let s = Server::start();
    let mut c = s.conn_db(4);
    let mut p = redis::pipe();
    for i in 0..100 {
        p.cmd("SET")
            .arg(format!("{{x}}:{i}"))
            .arg("v")
            .arg("PX")
            .arg(30)
            .ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    ok(&mut c, &["SET", "{x}:stay", "v"]);
    wait_until(Duration::from_secs(15), "active expiry in db 4", || {
        dbsize(&mut c) == 1
    });
    assert_eq!(slots_count(&mut c, H.slot(b"x")), 1);
    assert_exact(&mut c, H);
}

#[test]
fn lazy_expiry_on_access() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    let keys = tagged_keys("lazy", 12);
    let mut p = redis::pipe();
    for k in &keys {
        p.cmd("SET").arg(k).arg("v").arg("PX").arg(30).ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    ok(&mut c, &["SET", "{lazy}keep", "v"]);
    let ls = H.slot(b"lazy");
    sleep(Duration::from_millis(150));
    // Expired but not yet reclaimed: still physically in the keyspace.
    assert_eq!(
        dbsize(&mut c),
        13,
        "active expiry is off, keys are still there"
    );
    check(&mut c);

    // Each access path reclaims the key it touches.
    let accesses: Vec<Vec<&str>> = vec![
        vec!["GET", &keys[0]],
        vec!["EXISTS", &keys[1]],
        vec!["TTL", &keys[2]],
        vec!["TYPE", &keys[3]],
        vec!["STRLEN", &keys[4]],
        vec!["DEL", &keys[5]],
        vec!["EXPIRE", &keys[6], "100"],
        vec!["MGET", &keys[7], "{lazy}keep"],
    ];
    for (i, a) in accesses.iter().enumerate() {
        ok(&mut c, a);
        assert_eq!(dbsize(&mut c), 12 - i as u64, "after {a:?}");
        assert_eq!(slots_count(&mut c, ls), 12 - i as u64, "after {a:?}");
        check(&mut c);
    }
    // Writes onto an expired key: the old key is reclaimed, a new one created.
    ok(&mut c, &["LPUSH", &keys[8], "x"]);
    ok(&mut c, &["SET", &keys[9], "fresh"]);
    assert_eq!(slots_count(&mut c, ls), 5);
    // RENAME of an expired key fails (no such key) and reclaims it.
    expect_err(&mut c, &["RENAME", &keys[10], "{other}k"]);
    assert_eq!(slots_count(&mut c, H.slot(b"other")), 0);
    assert_eq!(slots_count(&mut c, ls), 4);
    // SCAN reclaims the rest.
    let all = all_keys(&mut c);
    assert_eq!(all.len(), 3);
    assert_eq!(slots_count(&mut c, ls), 3);
    assert_exact(&mut c, H);
}

#[test]
fn lazy_expiry_inside_transaction_and_script() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    let mut p = redis::pipe();
    for i in 0..10 {
        p.cmd("SET")
            .arg(format!("{{lx}}:{i}"))
            .arg("v")
            .arg("PX")
            .arg(20)
            .ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    sleep(Duration::from_millis(100));
    let mut p = redis::pipe();
    p.atomic().cmd("GET").arg("{lx}:0").cmd("GET").arg("{lx}:1");
    let _: redis::Value = p.query(&mut c).unwrap();
    ok(
        &mut c,
        &[
            "EVAL",
            "redis.call('GET', KEYS[1]); redis.call('EXISTS', KEYS[2]); return 1",
            "2",
            "{lx}:2",
            "{lx}:3",
        ],
    );
    check(&mut c);
    assert_eq!(slots_count(&mut c, H.slot(b"lx")), dbsize(&mut c));
    all_keys(&mut c);
    assert_eq!(dbsize(&mut c), 0);
    assert_exact(&mut c, H);
}

fn eviction_run(policy: &str, ttl: bool) {
    let s = Server::builder()
        .config(&format!("maxmemory-policy {policy}"))
        .start();
    let mut c = s.conn();
    let used: u64 = info(&mut c, "memory")["used_memory"].parse().unwrap();
    ok(
        &mut c,
        &[
            "CONFIG",
            "SET",
            "maxmemory",
            &(used + 3 * 1024 * 1024).to_string(),
        ],
    );
    let val = "x".repeat(1000);
    for batch in 0..20 {
        let mut p = redis::pipe();
        for i in 0..500 {
            let k = format!("{{ev{}}}:{batch}:{i}", i % 37);
            if ttl {
                p.cmd("SET").arg(k).arg(&val).arg("EX").arg(10000).ignore();
            } else {
                p.cmd("SET").arg(k).arg(&val).ignore();
            }
        }
        let _: () = p.query(&mut c).unwrap();
    }
    // While over the limit, 7.0 keeps evicting from a timer (evictionTimeProc),
    // so counts can only be compared once the limit is lifted.  SLOTS.CHECK
    // compares index and keyspace atomically, so it is valid right away.
    check(&mut c);
    ok(&mut c, &["CONFIG", "SET", "maxmemory", "0"]);
    let evicted: u64 = info(&mut c, "stats")["evicted_keys"].parse().unwrap();
    assert!(
        evicted > 0,
        "{policy}: expected evictions after writing ~10MB into 3MB"
    );
    let size = dbsize(&mut c);
    assert!(size < 10_000);
    assert_eq!(
        slots_info(&mut c).values().sum::<u64>(),
        size,
        "{policy}: index sum vs DBSIZE"
    );
    assert_eq!(slots_info_num(&mut c, "slots_keys_indexed"), size);
    assert_exact(&mut c, H);
}

#[test]
fn eviction_allkeys_random() {
    eviction_run("allkeys-random", false);
}

#[test]
fn eviction_allkeys_lru() {
    eviction_run("allkeys-lru", false);
}

#[test]
fn eviction_volatile_ttl() {
    eviction_run("volatile-ttl", true);
}
