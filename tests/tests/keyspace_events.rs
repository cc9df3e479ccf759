//! Every way a key comes or goes within one db must keep the index exact.

use std::time::Duration;

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn slot(k: &str) -> u32 {
    H.slot(k.as_bytes())
}

#[test]
fn set_del_unlink() {
    let s = Server::start();
    let mut c = s.conn();
    let keys: Vec<String> = (0..500).map(|i| format!("key:{i}")).collect();
    set_many(&mut c, &keys);
    assert_exact(&mut c, H);
    assert_eq!(slots_info(&mut c).values().sum::<u64>(), 500);

    // DEL one at a time, multi-key DEL, UNLINK, DEL of missing keys.
    let s0 = slot(&keys[0]);
    let before = slots_count(&mut c, s0);
    ok(&mut c, &["DEL", &keys[0]]);
    assert_eq!(slots_count(&mut c, s0), before - 1);
    let mut del = vec!["DEL".to_string()];
    del.extend(keys[1..100].iter().cloned());
    del.push("missing-key".into());
    assert_eq!(as_int(&ok(&mut c, &del)), 99);
    let mut unl = vec!["UNLINK".to_string()];
    unl.extend(keys[100..300].iter().cloned());
    assert_eq!(as_int(&ok(&mut c, &unl)), 200);
    assert_eq!(as_int(&ok(&mut c, &["DEL", "missing-key"])), 0);
    assert_exact(&mut c, H);
    assert_eq!(slots_info(&mut c).values().sum::<u64>(), 200);

    // Slot-level precision: a slot's count goes up and back down exactly.
    let ks = plain_keys_in_slot(H, 77, "p", 3);
    let base = model_counts(&mut c, H).get(&77).copied().unwrap_or(0);
    assert_eq!(slots_count(&mut c, 77), base);
    set_many(&mut c, &ks);
    assert_eq!(slots_count(&mut c, 77), base + 3);
    for k in &ks {
        ok(&mut c, &["DEL", k]);
    }
    assert_eq!(slots_count(&mut c, 77), base);
    let mut rest = vec!["DEL".to_string()];
    rest.extend(keys[300..].iter().cloned());
    ok(&mut c, &rest);
    assert_eq!(
        slots_info(&mut c).len(),
        0,
        "all keys gone -> SLOTS.INFO empty"
    );
    assert_eq!(slots_info_num(&mut c, "slots_keys_indexed"), 0);
    assert_eq!(slots_info_num(&mut c, "slots_nonempty_slots"), 0);
    check(&mut c);
}

#[test]
fn rename_and_renamenx() {
    let s = Server::start();
    let mut c = s.conn();
    let a = plain_keys_in_slot(H, 10, "a", 3);
    let b = plain_keys_in_slot(H, 20, "b", 3);
    set_many(&mut c, &a);
    set_many(&mut c, &b);

    // RENAME to a new key in another slot.
    ok(&mut c, &["RENAME", &a[0], "{x}new"]);
    assert_eq!(slots_count(&mut c, 10), 2);
    assert_eq!(slots_count(&mut c, slot("x")), 1);
    assert_exact(&mut c, H);

    // RENAME onto an existing key in another slot (target overwritten).
    ok(&mut c, &["RENAME", &a[1], &b[0]]);
    assert_eq!(slots_count(&mut c, 10), 1);
    assert_eq!(slots_count(&mut c, 20), 3);
    assert_exact(&mut c, H);

    // RENAME onto an existing key in the same slot.
    ok(&mut c, &["RENAME", &b[1], &b[2]]);
    assert_eq!(slots_count(&mut c, 20), 2);
    assert_exact(&mut c, H);

    // RENAME to itself.
    ok(&mut c, &["RENAME", &b[0], &b[0]]);
    assert_eq!(slots_count(&mut c, 20), 2);

    // RENAMENX onto an existing key: no-op; onto a new key: moves.
    assert_eq!(as_int(&ok(&mut c, &["RENAMENX", &a[2], &b[0]])), 0);
    assert_eq!(slots_count(&mut c, 10), 1);
    assert_eq!(as_int(&ok(&mut c, &["RENAMENX", &a[2], "{y}z"])), 1);
    assert_eq!(slots_count(&mut c, 10), 0);
    assert_eq!(slots_count(&mut c, slot("y")), 1);
    assert_exact(&mut c, H);

    // RENAME of a missing key fails and changes nothing.
    expect_err(&mut c, &["RENAME", "nosuch", "{q}other"]);
    assert_eq!(slots_count(&mut c, slot("q")), 0);

    // RENAME of a key with a TTL, and of a container.
    ok(&mut c, &["SET", "{ttl}k", "v", "EX", "1000"]);
    ok(&mut c, &["RENAME", "{ttl}k", "{ttl2}k"]);
    ok(&mut c, &["RPUSH", "{l}list", "1", "2"]);
    ok(&mut c, &["RENAME", "{l}list", "{l2}list"]);
    assert_eq!(slots_count(&mut c, slot("ttl")), 0);
    assert_eq!(slots_count(&mut c, slot("l2")), 1);
    assert_exact(&mut c, H);
}

#[test]
fn containers_becoming_empty() {
    let s = Server::start();
    let mut c = s.conn();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["RPUSH", "{c}list", "a"], vec!["LPOP", "{c}list"]),
        (
            vec!["RPUSH", "{c}list2", "a", "b"],
            vec!["RPOP", "{c}list2", "2"],
        ),
        (
            vec!["RPUSH", "{c}list3", "a", "b"],
            vec!["LTRIM", "{c}list3", "5", "10"],
        ),
        (
            vec!["RPUSH", "{c}list4", "a", "a"],
            vec!["LREM", "{c}list4", "0", "a"],
        ),
        (
            vec!["HSET", "{c}hash", "f", "v"],
            vec!["HDEL", "{c}hash", "f"],
        ),
        (vec!["SADD", "{c}set", "m"], vec!["SREM", "{c}set", "m"]),
        (vec!["SADD", "{c}set2", "m"], vec!["SPOP", "{c}set2"]),
        (
            vec!["ZADD", "{c}zset", "1", "m"],
            vec!["ZREM", "{c}zset", "m"],
        ),
        (
            vec!["ZADD", "{c}zset2", "1", "m", "2", "n"],
            vec!["ZPOPMIN", "{c}zset2", "5"],
        ),
        (
            vec!["ZADD", "{c}zset3", "1", "m"],
            vec!["ZPOPMAX", "{c}zset3"],
        ),
        (
            vec!["ZADD", "{c}zset4", "1", "m"],
            vec!["ZREMRANGEBYSCORE", "{c}zset4", "-inf", "+inf"],
        ),
        (
            vec!["ZADD", "{c}zset5", "1", "m"],
            vec!["ZREMRANGEBYRANK", "{c}zset5", "0", "-1"],
        ),
        (vec!["SET", "{c}str", "v"], vec!["GETDEL", "{c}str"]),
        (vec!["SET", "{c}str2", "v"], vec!["EXPIRE", "{c}str2", "-1"]),
        (
            vec!["SET", "{c}str3", "v"],
            vec!["PEXPIREAT", "{c}str3", "1"],
        ),
        (
            vec!["SET", "{c}str4", "v"],
            vec!["GETEX", "{c}str4", "PXAT", "1"],
        ),
        (
            vec!["SET", "{c}str5", "v"],
            vec!["SET", "{c}str5", "v", "EXAT", "1"],
        ),
        (
            vec!["RPUSH", "{c}lm", "a"],
            vec!["LMOVE", "{c}lm", "{c}lm-dst", "LEFT", "RIGHT"],
        ),
        (
            vec!["SADD", "{c}sm", "a"],
            vec!["SMOVE", "{c}sm", "{c}sm-dst", "a"],
        ),
    ];
    let cs = slot("c");
    for (create, empty) in &cases {
        ok(&mut c, create);
        let n = slots_count(&mut c, cs);
        assert_eq!(n, dbsize(&mut c), "after {create:?}");
        ok(&mut c, empty);
        assert_eq!(
            as_int(&ok(&mut c, &["EXISTS", create[1]])),
            0,
            "{empty:?} should delete {}",
            create[1]
        );
        assert_eq!(slots_count(&mut c, cs), dbsize(&mut c), "after {empty:?}");
        check(&mut c);
    }
    // LMOVE/SMOVE created their destinations.
    assert_eq!(dbsize(&mut c), 2);
    assert_eq!(slots_count(&mut c, cs), 2);
    assert_exact(&mut c, H);

    // Set operations with empty result onto an existing key delete it.
    ok(&mut c, &["SET", "{d}dst", "x"]);
    ok(&mut c, &["SADD", "{d}s1", "a"]);
    ok(&mut c, &["SADD", "{d}s2", "b"]);
    assert_eq!(
        as_int(&ok(&mut c, &["SINTERSTORE", "{d}dst", "{d}s1", "{d}s2"])),
        0
    );
    assert_eq!(slots_count(&mut c, slot("d")), 2);
    ok(&mut c, &["SET", "{d}dst", "x"]);
    ok(&mut c, &["SDIFFSTORE", "{d}dst", "{d}s1", "{d}s1"]);
    assert_eq!(slots_count(&mut c, slot("d")), 2);
    ok(&mut c, &["SET", "{d}dst", "x"]);
    ok(&mut c, &["ZUNIONSTORE", "{d}dst", "1", "{d}nosuch"]);
    assert_eq!(slots_count(&mut c, slot("d")), 2);
    ok(&mut c, &["SET", "{d}dst", "x"]);
    ok(&mut c, &["SORT", "{d}nosuch", "STORE", "{d}dst"]);
    assert_eq!(slots_count(&mut c, slot("d")), 2);
    ok(&mut c, &["SET", "{d}dst", "x"]);
    ok(&mut c, &["BITOP", "AND", "{d}dst", "{d}nosuch"]);
    assert_eq!(slots_count(&mut c, slot("d")), 2);
    // Non-empty result creates the key.
    ok(&mut c, &["SUNIONSTORE", "{d}dst", "{d}s1", "{d}s2"]);
    assert_eq!(slots_count(&mut c, slot("d")), 3);
    assert_exact(&mut c, H);
}

#[test]
fn streams_stay_when_empty() {
    let s = Server::start();
    let mut c = s.conn();
    let id = as_string(&ok(&mut c, &["XADD", "{s}stream", "*", "f", "v"]));
    assert_eq!(slots_count(&mut c, slot("s")), 1);
    assert_eq!(as_int(&ok(&mut c, &["XDEL", "{s}stream", &id])), 1);
    // An empty stream is still a key.
    assert_eq!(as_int(&ok(&mut c, &["EXISTS", "{s}stream"])), 1);
    assert_eq!(slots_count(&mut c, slot("s")), 1);
    ok(&mut c, &["XTRIM", "{s}stream", "MAXLEN", "0"]);
    assert_eq!(slots_count(&mut c, slot("s")), 1);
    ok(
        &mut c,
        &["XGROUP", "CREATE", "{s}stream2", "g", "$", "MKSTREAM"],
    );
    assert_eq!(slots_count(&mut c, slot("s")), 2);
    ok(&mut c, &["DEL", "{s}stream"]);
    assert_eq!(slots_count(&mut c, slot("s")), 1);
    assert_exact(&mut c, H);
}

#[test]
fn other_types_create_and_delete() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["PFADD", "{o}hll", "a", "b"]);
    ok(&mut c, &["GEOADD", "{o}geo", "13.36", "38.11", "p"]);
    ok(&mut c, &["SETBIT", "{o}bits", "100", "1"]);
    ok(&mut c, &["HINCRBY", "{o}h", "f", "1"]);
    ok(&mut c, &["ZINCRBY", "{o}z", "1", "m"]);
    ok(&mut c, &["LPUSHX", "{o}nolist", "x"]); // no key created
    ok(&mut c, &["PFMERGE", "{o}hll2", "{o}hll"]);
    ok(&mut c, &["SETEX", "{o}setex", "1000", "v"]);
    ok(&mut c, &["PSETEX", "{o}psetex", "100000", "v"]);
    ok(&mut c, &["INCRBYFLOAT", "{o}f", "1.5"]);
    assert_eq!(slots_count(&mut c, slot("o")), 9);
    ok(
        &mut c,
        &[
            "GEOSEARCHSTORE",
            "{o}geo2",
            "{o}geo",
            "FROMLONLAT",
            "0",
            "0",
            "BYRADIUS",
            "1",
            "m",
        ],
    );
    assert_eq!(
        slots_count(&mut c, slot("o")),
        9,
        "empty GEOSEARCHSTORE result creates nothing"
    );
    ok(&mut c, &["COPY", "{o}h", "{o}h2"]);
    assert_eq!(slots_count(&mut c, slot("o")), 10);
    assert_exact(&mut c, H);
    ok(
        &mut c,
        &[
            "DEL", "{o}hll", "{o}geo", "{o}bits", "{o}h", "{o}z", "{o}hll2",
        ],
    );
    assert_eq!(slots_count(&mut c, slot("o")), 4);
    assert_exact(&mut c, H);
}

#[test]
fn multi_exec() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["SET", "{m}pre", "1"]);
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SET")
        .arg("{m}a")
        .arg("1")
        .ignore()
        .cmd("SET")
        .arg("{m}b")
        .arg("1")
        .ignore()
        .cmd("DEL")
        .arg("{m}pre")
        .ignore()
        .cmd("RENAME")
        .arg("{m}a")
        .arg("{n}a")
        .ignore()
        .cmd("LPUSH")
        .arg("{m}l")
        .arg("x")
        .ignore()
        .cmd("LPOP")
        .arg("{m}l")
        .ignore()
        .cmd("SET")
        .arg("{m}tmp")
        .arg("1")
        .ignore()
        .cmd("UNLINK")
        .arg("{m}tmp")
        .ignore();
    let _: () = p.query(&mut c).unwrap();
    assert_eq!(slots_count(&mut c, slot("m")), 1);
    assert_eq!(slots_count(&mut c, slot("n")), 1);
    assert_exact(&mut c, H);

    // DISCARDed transactions change nothing.
    ok(&mut c, &["MULTI"]);
    ok(&mut c, &["SET", "{m}never", "1"]);
    ok(&mut c, &["DISCARD"]);
    assert_eq!(slots_count(&mut c, slot("m")), 1);

    // EXEC with an error inside still applies the other commands.
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SET")
        .arg("{m}e1")
        .arg("1")
        .ignore()
        .cmd("LPUSH")
        .arg("{m}e1")
        .arg("x")
        .ignore() // WRONGTYPE at exec time
        .cmd("SET")
        .arg("{m}e2")
        .arg("1")
        .ignore();
    let _ = p.query::<redis::Value>(&mut c);
    assert_eq!(slots_count(&mut c, slot("m")), 3);
    assert_exact(&mut c, H);
}

#[test]
fn lua_scripts_write_and_delete() {
    let s = Server::start();
    let mut c = s.conn();
    let script = r#"
        for i = 1, 100 do redis.call('SET', KEYS[1] .. i, i) end
        for i = 1, 100, 2 do redis.call('DEL', KEYS[1] .. i) end
        redis.call('RPUSH', KEYS[2], 'a')
        redis.call('LPOP', KEYS[2])
        redis.call('SET', KEYS[3], 'x')
        redis.call('RENAME', KEYS[3], KEYS[4])
        return redis.call('DBSIZE')
    "#;
    let n = as_int(&ok(
        &mut c,
        &[
            "EVAL",
            script,
            "4",
            "{lua}k",
            "{lua}list",
            "{lua}r",
            "{lua2}r",
        ],
    ));
    assert_eq!(n, 51);
    assert_eq!(slots_count(&mut c, slot("lua")), 50);
    assert_eq!(slots_count(&mut c, slot("lua2")), 1);
    assert_exact(&mut c, H);

    // Script that SELECTs another db and writes there.
    let script2 = "redis.call('SELECT', 2); redis.call('SET', KEYS[1], 1); redis.call('SET', KEYS[2], 1); redis.call('DEL', KEYS[2]); return 1";
    ok(&mut c, &["EVAL", script2, "2", "{lua3}a", "{lua3}b"]);
    assert_eq!(slots_count(&mut c, slot("lua3")), 0, "db 0 untouched");
    let mut c2 = s.conn_db(2);
    assert_eq!(slots_count(&mut c2, slot("lua3")), 1);
    assert_exact_dbs(&mut c, H, &[0, 2]);

    // A script that errors half-way keeps its earlier writes.
    let bad = "redis.call('SET', KEYS[1], 1); redis.call('INCR', KEYS[2]); return 1";
    ok(&mut c, &["SET", "{lua}notanumber", "abc"]);
    expect_err(
        &mut c,
        &["EVAL", bad, "2", "{lua}written", "{lua}notanumber"],
    );
    assert_eq!(slots_count(&mut c, slot("lua")), 52);
    assert_exact(&mut c, H);

    // Functions too.
    ok(&mut c, &[
        "FUNCTION", "LOAD",
        "#!lua name=lib\nredis.register_function('mk', function(keys, args) redis.call('SET', keys[1], 1); redis.call('DEL', keys[2]); return 1 end)",
    ]);
    ok(&mut c, &["FCALL", "mk", "2", "{fn}a", "{lua}written"]);
    assert_eq!(slots_count(&mut c, slot("fn")), 1);
    assert_eq!(slots_count(&mut c, slot("lua")), 51);
    assert_exact(&mut c, H);
}

#[test]
fn blocking_pop_served_by_push() {
    let s = Server::start();
    let mut waiter = s.conn();
    let h = std::thread::spawn(move || {
        let v: redis::Value = redis::cmd("BLPOP")
            .arg("{b}q")
            .arg(10)
            .query(&mut waiter)
            .unwrap();
        v
    });
    let mut c = s.conn();
    // Wait until the client is blocked.
    wait_until(Duration::from_secs(10), "BLPOP client blocked", || {
        info(&mut c, "clients")
            .get("blocked_clients")
            .map(|v| v == "1")
            .unwrap_or(false)
    });
    ok(&mut c, &["RPUSH", "{b}q", "x"]);
    let v = h.join().unwrap();
    assert_ne!(v, redis::Value::Nil);
    // The list was created and immediately emptied by the blocked client.
    assert_eq!(as_int(&ok(&mut c, &["EXISTS", "{b}q"])), 0);
    assert_eq!(slots_count(&mut c, slot("b")), 0);
    assert_exact(&mut c, H);
}

#[test]
fn restore_variants() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["RPUSH", "{r}src", "a", "b"]);
    let dump = as_bytes(&ok(&mut c, &["DUMP", "{r}src"]));
    let rst = |c: &mut redis::Connection, key: &str, ttl: &str, extra: &[&str]| {
        let mut a: Vec<Vec<u8>> = vec![b"RESTORE".to_vec(), key.into(), ttl.into(), dump.clone()];
        a.extend(extra.iter().map(|x| x.as_bytes().to_vec()));
        run(c, &a)
    };
    // New key.
    rst(&mut c, "{r2}new", "0", &[]).unwrap();
    assert_eq!(slots_count(&mut c, slot("r2")), 1);
    // Existing key without REPLACE: BUSYKEY error, nothing changes.
    assert!(rst(&mut c, "{r2}new", "0", &[]).is_err());
    assert_eq!(slots_count(&mut c, slot("r2")), 1);
    // REPLACE onto an existing key (also of another type).
    ok(&mut c, &["SET", "{r3}str", "x"]);
    rst(&mut c, "{r3}str", "0", &["REPLACE"]).unwrap();
    assert_eq!(slots_count(&mut c, slot("r3")), 1);
    assert_eq!(as_string(&ok(&mut c, &["TYPE", "{r3}str"])), "list");
    // With a TTL.
    rst(&mut c, "{r4}ttl", "100000", &[]).unwrap();
    assert_eq!(slots_count(&mut c, slot("r4")), 1);
    assert_exact(&mut c, H);

    // Already-expired ABSTTL onto a new key: nothing is created.
    rst(&mut c, "{r5}gone", "1", &["ABSTTL"]).unwrap();
    assert_eq!(as_int(&ok(&mut c, &["EXISTS", "{r5}gone"])), 0);
    assert_eq!(slots_count(&mut c, slot("r5")), 0);
    // Already-expired ABSTTL with REPLACE onto an existing key: the key is deleted.
    ok(&mut c, &["SET", "{r6}old", "x"]);
    assert_eq!(slots_count(&mut c, slot("r6")), 1);
    rst(&mut c, "{r6}old", "1", &["ABSTTL", "REPLACE"]).unwrap();
    assert_eq!(as_int(&ok(&mut c, &["EXISTS", "{r6}old"])), 0);
    assert_eq!(slots_count(&mut c, slot("r6")), 0);
    // Future ABSTTL.
    let future = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 600_000)
        .to_string();
    rst(&mut c, "{r7}later", &future, &["ABSTTL", "IDLETIME", "5"]).unwrap();
    assert_eq!(slots_count(&mut c, slot("r7")), 1);
    // Bad payload: error, no key.
    assert!(run(&mut c, &["RESTORE", "{r8}bad", "0", "garbage"]).is_err());
    assert_eq!(slots_count(&mut c, slot("r8")), 0);
    assert_exact(&mut c, H);
}

#[test]
fn migrate_between_module_servers() {
    let src = Server::start();
    let dst = Server::start();
    let mut a = src.conn();
    let mut b = dst.conn();
    set_many(&mut a, &tagged_keys("mig", 20));
    ok(&mut a, &["HSET", "{mig2}h", "f", "v"]);
    let ms = slot("mig");
    let port = dst.port.to_string();

    // Single key.
    ok(
        &mut a,
        &["MIGRATE", "127.0.0.1", &port, "{mig}:0", "0", "5000"],
    );
    assert_eq!(slots_count(&mut a, ms), 19);
    assert_eq!(slots_count(&mut b, ms), 1);

    // KEYS form, several keys.
    let mut args: Vec<String> = ["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend((1..10).map(|i| format!("{{mig}}:{i}")));
    ok(&mut a, &args);
    assert_eq!(slots_count(&mut a, ms), 10);
    assert_eq!(slots_count(&mut b, ms), 10);

    // COPY leaves the source; REPLACE overwrites an existing target key.
    ok(
        &mut a,
        &[
            "MIGRATE",
            "127.0.0.1",
            &port,
            "{mig}:10",
            "0",
            "5000",
            "COPY",
        ],
    );
    assert_eq!(slots_count(&mut a, ms), 10);
    assert_eq!(slots_count(&mut b, ms), 11);
    ok(
        &mut a,
        &[
            "MIGRATE",
            "127.0.0.1",
            &port,
            "{mig}:10",
            "0",
            "5000",
            "REPLACE",
        ],
    );
    assert_eq!(slots_count(&mut a, ms), 9);
    assert_eq!(slots_count(&mut b, ms), 11);

    // Into another db of the target.
    ok(
        &mut a,
        &["MIGRATE", "127.0.0.1", &port, "{mig2}h", "3", "5000"],
    );
    assert_eq!(slots_count(&mut a, slot("mig2")), 0);
    let mut b3 = dst.conn_db(3);
    assert_eq!(slots_count(&mut b3, slot("mig2")), 1);

    assert_exact(&mut a, H);
    assert_exact_dbs(&mut b, H, &[0, 3]);
    let bk: std::collections::BTreeSet<Vec<u8>> = slots_keys(&mut b, ms, 100).into_iter().collect();
    assert!(bk.contains(b"{mig}:0".as_slice()));
    assert!(bk.contains(b"{mig}:10".as_slice()));
}

#[test]
fn expire_in_the_past_and_persist() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("e", 10));
    ok(&mut c, &["EXPIRE", "{e}:0", "0"]);
    ok(&mut c, &["PEXPIRE", "{e}:1", "-100"]);
    ok(&mut c, &["EXPIREAT", "{e}:2", "1"]);
    ok(&mut c, &["EXPIRE", "{e}:3", "1000"]);
    ok(&mut c, &["PERSIST", "{e}:3"]);
    assert_eq!(slots_count(&mut c, slot("e")), 7);
    assert_exact(&mut c, H);
}

/// Another module deletes keys through the key API (`RM_DeleteKey`), which
/// fires no keyspace event; nothing else touches the database afterwards.
/// The periodic count check still notices within a fraction of a second and
/// rebuilds that database's index. A SLOTS.DEL of a slot holding such a
/// stale name still finishes (it used to pick the name again forever).
#[test]
fn keys_deleted_without_any_event_are_noticed() {
    let s = Server::builder().with_helper_module().start();
    let mut c = s.conn();
    let tag = tag_for_slot(H, 77);
    let keys = tagged_keys(&tag, 10);
    set_many(&mut c, &keys);
    let n: i64 = redis::cmd("HELPER.SILENTDEL")
        .arg(&keys[0])
        .arg(&keys[1])
        .query(&mut c)
        .unwrap();
    assert_eq!(n, 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while slots_count(&mut c, 77) != 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "the index still counts keys deleted without events: {}",
            slots_count(&mut c, 77)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(slots_info_num(&mut c, "slots_index_resyncs") >= 1);
    check(&mut c);

    // A stale name in a slot that SLOTS.DEL empties: the deletion and the
    // silent delete in one pipeline, before any check can run.
    let tag2 = tag_for_slot(H, 78);
    let keys2 = tagged_keys(&tag2, 50);
    set_many(&mut c, &keys2);
    let _: () = redis::pipe()
        .cmd("HELPER.SILENTDEL")
        .arg(&keys2[7])
        .ignore()
        .cmd("SLOTS.DEL")
        .arg(78)
        .ignore()
        .query(&mut c)
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while slots_info_num(&mut c, "slots_del_pending_slots") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "SLOTS.DEL of a slot with a stale name does not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(slots_count(&mut c, 78), 0);
    assert_eq!(dbsize(&mut c), 8);
    check(&mut c);
}
