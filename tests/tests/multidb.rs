//! Commands that move keys between dbs or drop whole dbs.

use std::collections::BTreeMap;
use std::time::Duration;

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn slot(k: &str) -> u32 {
    H.slot(k.as_bytes())
}

fn select(c: &mut redis::Connection, db: i64) {
    ok(c, &["SELECT".to_string(), db.to_string()]);
}

#[test]
fn move_to_db1() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("mv", 5));
    ok(&mut c, &["HSET", "{mv}h", "f", "v"]);
    ok(&mut c, &["SET", "{mv}ttl", "v", "EX", "1000"]);
    let ms = slot("mv");
    assert_eq!(as_int(&ok(&mut c, &["MOVE", "{mv}:0", "1"])), 1);
    assert_eq!(as_int(&ok(&mut c, &["MOVE", "{mv}h", "1"])), 1);
    assert_eq!(as_int(&ok(&mut c, &["MOVE", "{mv}ttl", "1"])), 1);
    assert_eq!(slots_count(&mut c, ms), 4);
    select(&mut c, 1);
    assert_eq!(slots_count(&mut c, ms), 3);
    // MOVE back, and MOVE onto an existing key (fails, nothing changes).
    ok(&mut c, &["SET", "{mv}:1", "in-db1"]);
    assert_eq!(slots_count(&mut c, ms), 4);
    select(&mut c, 0);
    assert_eq!(as_int(&ok(&mut c, &["MOVE", "{mv}:1", "1"])), 0);
    assert_eq!(slots_count(&mut c, ms), 4);
    select(&mut c, 1);
    assert_eq!(as_int(&ok(&mut c, &["MOVE", "{mv}:0", "0"])), 1);
    assert_eq!(slots_count(&mut c, ms), 3);
    select(&mut c, 0);
    assert_eq!(slots_count(&mut c, ms), 5);
    // MOVE of a missing key.
    assert_eq!(as_int(&ok(&mut c, &["MOVE", "nosuch", "1"])), 0);
    assert_exact_dbs(&mut c, H, &[0, 1]);
    let keys1: std::collections::BTreeSet<Vec<u8>> = {
        let mut c1 = s.conn_db(1);
        slots_keys(&mut c1, ms, 100).into_iter().collect()
    };
    assert_eq!(keys1.len(), 3);
    assert!(keys1.contains(b"{mv}h".as_slice()));
}

#[test]
fn copy_with_db_and_replace() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["SADD", "{cp}set", "a", "b"]);
    ok(&mut c, &["SET", "{cp}str", "x"]);
    // Same db, other slot.
    assert_eq!(as_int(&ok(&mut c, &["COPY", "{cp}set", "{cp2}set"])), 1);
    assert_eq!(slots_count(&mut c, slot("cp2")), 1);
    // Existing destination without REPLACE: 0, no change.
    assert_eq!(as_int(&ok(&mut c, &["COPY", "{cp}set", "{cp}str"])), 0);
    assert_eq!(slots_count(&mut c, slot("cp")), 2);
    // With REPLACE.
    assert_eq!(
        as_int(&ok(&mut c, &["COPY", "{cp}set", "{cp}str", "REPLACE"])),
        1
    );
    assert_eq!(slots_count(&mut c, slot("cp")), 2);
    // To another db.
    assert_eq!(
        as_int(&ok(&mut c, &["COPY", "{cp}set", "{cp3}set", "DB", "1"])),
        1
    );
    assert_eq!(
        as_int(&ok(&mut c, &["COPY", "{cp}set", "{cp}set", "DB", "1"])),
        1
    );
    assert_eq!(slots_count(&mut c, slot("cp3")), 0);
    select(&mut c, 1);
    assert_eq!(slots_count(&mut c, slot("cp3")), 1);
    assert_eq!(slots_count(&mut c, slot("cp")), 1);
    select(&mut c, 0);
    // To another db, existing, REPLACE.
    assert_eq!(
        as_int(&ok(&mut c, &["COPY", "{cp}str", "{cp}set", "DB", "1"])),
        0
    );
    assert_eq!(
        as_int(&ok(
            &mut c,
            &["COPY", "{cp}str", "{cp}set", "DB", "1", "REPLACE"]
        )),
        1
    );
    assert_exact_dbs(&mut c, H, &[0, 1]);
    assert_eq!(dbsize(&mut c), 3);
}

#[test]
fn swapdb() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("zero", 7));
    select(&mut c, 1);
    set_many(&mut c, &tagged_keys("one", 3));
    select(&mut c, 0);
    let z = slot("zero");
    let o = slot("one");
    let info0: BTreeMap<u32, u64> = slots_info(&mut c);
    ok(&mut c, &["SWAPDB", "0", "1"]);
    // The connection stays on db 0, which now holds the old db 1.
    assert_eq!(slots_count(&mut c, o), 3);
    assert_eq!(slots_count(&mut c, z), if z == o { 3 } else { 0 });
    select(&mut c, 1);
    assert_eq!(slots_info(&mut c), info0);
    assert_exact_dbs(&mut c, H, &[0, 1]);

    // Writes after the swap land in the right index.
    select(&mut c, 0);
    ok(&mut c, &["SET", "{one}:new", "1"]);
    ok(&mut c, &["DEL", "{one}:0"]);
    select(&mut c, 1);
    ok(&mut c, &["DEL", "{zero}:0", "{zero}:1"]);
    assert_exact_dbs(&mut c, H, &[0, 1]);
    select(&mut c, 0);
    assert_eq!(slots_count(&mut c, o), 3);
    select(&mut c, 1);
    assert_eq!(slots_count(&mut c, z), 5);

    // Swap with an empty db, and swap a db with itself.
    ok(&mut c, &["SWAPDB", "1", "5"]);
    ok(&mut c, &["SWAPDB", "0", "0"]);
    assert_eq!(slots_info(&mut c).len(), 0, "db 1 is now empty");
    select(&mut c, 5);
    assert_eq!(slots_count(&mut c, z), 5);
    assert_exact_dbs(&mut c, H, &[0, 1, 5]);
    check(&mut c);
}

#[test]
fn flushdb_and_flushall_sync_and_async() {
    let s = Server::start();
    let mut c = s.conn();
    let fill = |c: &mut redis::Connection| {
        for db in [0, 1, 2] {
            select(c, db);
            set_many(
                c,
                &(0..2000).map(|i| format!("k{db}:{i}")).collect::<Vec<_>>(),
            );
        }
        select(c, 0);
    };
    for (cmd, arg) in [
        ("FLUSHDB", None),
        ("FLUSHDB", Some("ASYNC")),
        ("FLUSHDB", Some("SYNC")),
    ] {
        fill(&mut c);
        select(&mut c, 1);
        let mut a = vec![cmd];
        a.extend(arg);
        ok(&mut c, &a);
        assert_eq!(slots_info(&mut c).len(), 0, "{a:?}: db 1 index empty");
        assert_eq!(
            slots_info_num(&mut c, "slots_keys_indexed"),
            4000,
            "{a:?}: dbs 0 and 2 remain"
        );
        // Writes right after an async flush are indexed.
        ok(&mut c, &["SET", "after", "1"]);
        assert_eq!(slots_count(&mut c, slot("after")), 1);
        assert_exact_dbs(&mut c, H, &[0, 1, 2]);
        ok(&mut c, &["FLUSHALL"]);
    }
    for arg in [None, Some("ASYNC"), Some("SYNC")] {
        fill(&mut c);
        let mut a = vec!["FLUSHALL"];
        a.extend(arg);
        ok(&mut c, &a);
        for db in [0, 1, 2] {
            select(&mut c, db);
            assert_eq!(slots_info(&mut c).len(), 0, "{a:?}: db {db}");
        }
        assert_eq!(slots_info_num(&mut c, "slots_keys_indexed"), 0);
        assert_eq!(slots_info_num(&mut c, "slots_nonempty_slots"), 0);
        ok(&mut c, &["SET", "after", "1"]);
        assert_exact_dbs(&mut c, H, &[0, 1, 2]);
        ok(&mut c, &["FLUSHALL"]);
    }
    check(&mut c);
}

#[test]
fn flushall_inside_multi_and_script() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("f", 100));
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SET")
        .arg("{f}x")
        .arg("1")
        .ignore()
        .cmd("FLUSHALL")
        .ignore()
        .cmd("SET")
        .arg("{f}y")
        .arg("1")
        .ignore();
    let _: () = p.query(&mut c).unwrap();
    assert_eq!(slots_count(&mut c, slot("f")), 1);
    assert_exact(&mut c, H);
    let _ = Duration::from_secs(0);
}

/// The client stays on its database after MOVE and COPY ... DB, also inside
/// MULTI after a queued SELECT. (Valkey 8.1 leaves it on the destination
/// database when any module subscribes to keyspace events; the module puts
/// it back. On Redis this holds anyway.)
#[test]
fn client_db_unchanged_by_move_and_copy() {
    let s = Server::start();
    let mut c = s.conn();
    let db_of = |c: &mut redis::Connection| -> String {
        let info = as_string(&ok(c, &["CLIENT", "INFO"]));
        info.split(' ')
            .find_map(|f| f.strip_prefix("db=").map(str::to_string))
            .expect("db= in CLIENT INFO")
    };
    ok(&mut c, &["SET", "m1", "v"]);
    ok(&mut c, &["MOVE", "m1", "3"]);
    assert_eq!(db_of(&mut c), "0", "after MOVE");
    ok(&mut c, &["SET", "c1", "v"]);
    ok(&mut c, &["COPY", "c1", "c1", "DB", "4"]);
    assert_eq!(db_of(&mut c), "0", "after COPY ... DB");
    // Keys named like the option, and a destination key named like a
    // number: only the arguments after both key names are options.
    ok(&mut c, &["SET", "db", "v"]);
    ok(&mut c, &["COPY", "db", "x", "DB", "4"]);
    assert_eq!(db_of(&mut c), "0", "after COPY db x DB 4");
    ok(&mut c, &["COPY", "db", "7", "DB", "1"]);
    assert_eq!(db_of(&mut c), "0", "after COPY db 7 DB 1");
    // In a transaction: SELECT 2, then COPY from db 2 to db 5, then a SET
    // that must land in db 2.
    ok(&mut c, &["SELECT", "2"]);
    ok(&mut c, &["SET", "c2", "v"]);
    ok(&mut c, &["SELECT", "0"]);
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SELECT")
        .arg(2)
        .cmd("COPY")
        .arg("c2")
        .arg("c2")
        .arg("DB")
        .arg(5)
        .cmd("SET")
        .arg("after-copy")
        .arg("v")
        .cmd("MOVE")
        .arg("after-copy")
        .arg(6)
        .cmd("SET")
        .arg("after-move")
        .arg("v");
    let _: redis::Value = p.query(&mut c).unwrap();
    assert_eq!(db_of(&mut c), "2", "after MULTI");
    let mut c2 = s.conn_db(2);
    assert_eq!(as_int(&ok(&mut c2, &["EXISTS", "after-move", "c2"])), 2);
    let mut c5 = s.conn_db(5);
    assert_eq!(as_int(&ok(&mut c5, &["EXISTS", "c2"])), 1);
    let mut c6 = s.conn_db(6);
    assert_eq!(as_int(&ok(&mut c6, &["EXISTS", "after-copy"])), 1);
    assert_exact_dbs(&mut c, HashFn::Crc32, &[0, 1, 2, 3, 4, 5, 6]);
}
