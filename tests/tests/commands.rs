//! The SLOTS.* commands on a default (crc32, full index) server.

use std::collections::{BTreeMap, BTreeSet};

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

/// Fill slots 5 (3 keys), 300 (17 keys), 1023 (1 key) and a few plain keys.
fn populate(c: &mut redis::Connection) -> BTreeMap<u32, Vec<String>> {
    let mut m = BTreeMap::new();
    for (slot, n) in [(5u32, 3usize), (300, 17), (1023, 1)] {
        let keys = tagged_keys(&tag_for_slot(H, slot), n);
        set_many(c, &keys);
        m.insert(slot, keys);
    }
    m
}

#[test]
fn hashkey_crc32_vectors() {
    let s = Server::start();
    let mut c = s.conn();
    assert_eq!(
        hashkey(&mut c, b"123456789"),
        294,
        "crc32(123456789)=0xCBF43926 & 1023"
    );
    assert_eq!(
        hashkey(&mut c, b"a{}b"),
        0,
        "empty tag hashes the empty string"
    );
    assert_eq!(hashkey(&mut c, b"{}"), 0);
    assert_eq!(hashkey(&mut c, b""), 0, "crc32(\"\") = 0");
    assert_eq!(
        hashkey(&mut c, b"foo{}{bar}"),
        0,
        "first {{...}} pair is the empty tag"
    );
    let u = hashkey(&mut c, b"user1000");
    assert_eq!(u, H.slot(b"user1000"));
    assert_eq!(hashkey(&mut c, b"{user1000}.following"), u);
    assert_eq!(
        hashkey(&mut c, b"xx{user1000}yy{zz}"),
        u,
        "only the first tag counts"
    );
    assert_eq!(
        hashkey(&mut c, b"}{user1000}"),
        u,
        "a closing brace before the first opening brace is ignored"
    );
    assert_eq!(
        hashkey(&mut c, b"foo{"),
        H.slot(b"foo{"),
        "unclosed brace -> whole key"
    );
    assert_eq!(hashkey(&mut c, b"foo}bar{"), H.slot(b"foo}bar{"));
    assert_eq!(
        hashkey(&mut c, b"{{bar}}"),
        H.slot(b"{bar"),
        "tag is '{{bar'"
    );
}

#[test]
fn hashkey_many_keys_and_reference_agreement() {
    let s = Server::start();
    let mut c = s.conn();
    // One call with many keys: reply order follows argument order.
    let keys: Vec<Vec<u8>> = (0..300u32)
        .map(|i| {
            let mut k = format!("key:{i}:").into_bytes();
            k.extend_from_slice(&i.to_le_bytes()); // binary, includes NUL bytes
            if i % 3 == 0 {
                k = [b"pre{".as_slice(), &k, b"}post"].concat();
            }
            k
        })
        .collect();
    let mut args: Vec<&[u8]> = vec![b"SLOTS.HASHKEY"];
    args.extend(keys.iter().map(|k| k.as_slice()));
    let v = ok(&mut c, &args);
    let got: Vec<u32> = as_array(&v).iter().map(|x| as_int(x) as u32).collect();
    let want: Vec<u32> = keys.iter().map(|k| H.slot(k)).collect();
    assert_eq!(got, want);
    assert!(got.iter().all(|&s| s < 1024));
}

#[test]
fn hashkey_binary_and_nul_tags() {
    let s = Server::start();
    let mut c = s.conn();
    let cases: Vec<&[u8]> = vec![
        b"\0",
        b"a\0{b\0c}d",
        b"{\0}",
        b"{\xff\xfe}rest",
        b"\xff{",
        b"x{}\0",
        b"\0{\0",
    ];
    for k in cases {
        assert_eq!(hashkey(&mut c, k), H.slot(k), "SLOTS.HASHKEY {k:?}");
    }
    assert_eq!(hashkey(&mut c, b"a\0{b\0c}d"), hashkey(&mut c, b"b\0c"));
}

#[test]
fn info_count_keys_basic() {
    let s = Server::start();
    let mut c = s.conn();
    assert_eq!(
        slots_info(&mut c),
        BTreeMap::new(),
        "empty db -> empty SLOTS.INFO"
    );
    assert_eq!(slots_count(&mut c, 0), 0);
    let m = populate(&mut c);

    let info = slots_info_entries(&mut c);
    assert_eq!(
        info,
        vec![
            SlotEntry {
                slot: 5,
                keys: 3,
                deleting: false
            },
            SlotEntry {
                slot: 300,
                keys: 17,
                deleting: false
            },
            SlotEntry {
                slot: 1023,
                keys: 1,
                deleting: false
            },
        ]
    );
    assert_eq!(slots_count(&mut c, 5), 3);
    assert_eq!(slots_count(&mut c, 300), 17);
    assert_eq!(slots_count(&mut c, 1023), 1);
    assert_eq!(slots_count(&mut c, 6), 0);

    // Windows: start <= slot < start+count.
    let win = |c: &mut redis::Connection, args: &[&str]| -> Vec<u32> {
        let mut a = vec!["SLOTS.INFO"];
        a.extend_from_slice(args);
        parse_slots_info(&ok(c, &a))
            .iter()
            .map(|e| e.slot)
            .collect()
    };
    assert_eq!(win(&mut c, &["0"]), vec![5, 300, 1023]);
    assert_eq!(win(&mut c, &["5"]), vec![5, 300, 1023]);
    assert_eq!(win(&mut c, &["6"]), vec![300, 1023]);
    assert_eq!(win(&mut c, &["1023"]), vec![1023]);
    assert_eq!(
        win(&mut c, &["0", "5"]),
        Vec::<u32>::new(),
        "slot 5 is not < 0+5"
    );
    assert_eq!(win(&mut c, &["0", "6"]), vec![5]);
    assert_eq!(win(&mut c, &["5", "1"]), vec![5]);
    assert_eq!(win(&mut c, &["6", "294"]), Vec::<u32>::new());
    assert_eq!(win(&mut c, &["6", "295"]), vec![300]);
    assert_eq!(win(&mut c, &["300", "1000"]), vec![300, 1023]);
    assert_eq!(win(&mut c, &["0", "1024"]), vec![5, 300, 1023]);
    assert_eq!(win(&mut c, &["0", "0"]), Vec::<u32>::new());

    // SLOTS.KEYS.
    for (&slot, keys) in &m {
        let want: BTreeSet<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
        let all: BTreeSet<Vec<u8>> = slots_keys(&mut c, slot, 1000).into_iter().collect();
        assert_eq!(all, want, "SLOTS.KEYS {slot} 1000");
        let exact = slots_keys(&mut c, slot, keys.len() as u64);
        assert_eq!(exact.len(), keys.len());
        let some = slots_keys(&mut c, slot, 2);
        assert_eq!(some.len(), 2.min(keys.len()), "SLOTS.KEYS {slot} 2");
        assert!(some.iter().all(|k| want.contains(k)));
        let dedup: BTreeSet<_> = some.iter().collect();
        assert_eq!(dedup.len(), some.len(), "no duplicates");
        assert!(
            slots_keys(&mut c, slot, 0).is_empty(),
            "count 0 -> empty array"
        );
    }
    assert!(slots_keys(&mut c, 6, 10).is_empty());
    assert_exact(&mut c, H);
}

#[test]
fn slots_keys_big_slot() {
    let mut s = Server::start();
    let mut c = s.conn();
    let keys = tagged_keys("big", 5000);
    set_many(&mut c, &keys);
    let slot = H.slot(b"big");
    assert_eq!(slots_count(&mut c, slot), 5000);
    assert_eq!(slots_keys(&mut c, slot, 1).len(), 1);
    assert_eq!(slots_keys(&mut c, slot, 4999).len(), 4999);
    let all: BTreeSet<Vec<u8>> = slots_keys(&mut c, slot, 100_000).into_iter().collect();
    assert_eq!(all.len(), 5000);
    // Huge count is a limit, not an allocation size.
    let v = ok(
        &mut c,
        &[
            "SLOTS.KEYS".to_string(),
            slot.to_string(),
            i64::MAX.to_string(),
        ],
    );
    assert_eq!(as_array(&v).len(), 5000);
    s.assert_alive("SLOTS.KEYS with a huge count");
}

#[test]
fn slots_scan_full_iteration() {
    let s = Server::start();
    let mut c = s.conn();
    let m = populate(&mut c);
    let big = tagged_keys("scanme", 2500);
    set_many(&mut c, &big);
    let big_slot = H.slot(b"scanme");
    let mut all = m.clone();
    all.entry(big_slot).or_default().extend(big.clone());

    for count in [None, Some(1), Some(7), Some(10_000)] {
        for (&slot, keys) in &all {
            let want: BTreeSet<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
            let got = slots_scan_all(&mut c, slot, count);
            for k in &got {
                assert_eq!(
                    H.slot(k),
                    slot,
                    "SLOTS.SCAN {slot} returned key of another slot"
                );
            }
            let set: BTreeSet<Vec<u8>> = got.into_iter().collect();
            assert_eq!(set, want, "SLOTS.SCAN {slot} COUNT {count:?}");
        }
    }
    // Empty slot: one call, cursor "0", no keys.
    let (cur, keys) = slots_scan_once(&mut c, 6, "0", None);
    assert_eq!(cur, "0");
    assert!(keys.is_empty());

    // COUNT is a hint, but with a 2500-key slot a COUNT 10 call must not return
    // everything at once, and the default COUNT (10) must paginate too.
    let (cur, keys) = slots_scan_once(&mut c, big_slot, "0", Some(10));
    assert_ne!(cur, "0", "COUNT 10 over 2500 keys finished in one call");
    assert!(keys.len() < 2500);
    let (cur, keys) = slots_scan_once(&mut c, big_slot, "0", None);
    assert_ne!(
        cur, "0",
        "default COUNT over 2500 keys finished in one call"
    );
    assert!(keys.len() < 2500);
}

#[test]
fn slots_scan_lowercase_count_option() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("lc", 50));
    let slot = H.slot(b"lc");
    let v = ok(
        &mut c,
        &[
            "slots.scan".to_string(),
            slot.to_string(),
            "0".into(),
            "count".into(),
            "100".into(),
        ],
    );
    let a = as_array(&v);
    let n = as_array(&a[1]).len();
    assert!((1..=50).contains(&n), "got {n} keys");
}

#[test]
fn info_slots_fields() {
    let s = Server::start();
    let mut c = s.conn();
    let m = populate(&mut c);
    let total: usize = m.values().map(|v| v.len()).sum();
    let i = info(&mut c, "slots");
    for f in [
        "slots_hash_function",
        "slots_slot_count",
        "slots_index_mode",
        "slots_keys_indexed",
        "slots_index_bytes",
        "slots_nonempty_slots",
        "slots_del_pending_slots",
        "slots_del_pending_keys",
        "slots_del_deleted_keys",
        "slots_index_rebuilds",
    ] {
        assert!(i.contains_key(f), "INFO slots lacks {f}: {i:?}");
    }
    assert_eq!(i["slots_hash_function"], "crc32");
    assert_eq!(i["slots_slot_count"], "1024");
    assert_eq!(i["slots_index_mode"], "full");
    assert_eq!(i["slots_keys_indexed"], total.to_string());
    assert_eq!(i["slots_nonempty_slots"], "3");
    assert_eq!(i["slots_del_pending_slots"], "0");
    assert_eq!(i["slots_del_pending_keys"], "0");
    assert_eq!(i["slots_del_deleted_keys"], "0");
    assert!(i["slots_index_bytes"].parse::<u64>().unwrap() > 0);
    i["slots_index_rebuilds"].parse::<u64>().unwrap();

    // Fields track changes.
    ok(&mut c, &["DEL", &m[&1023][0]]);
    assert_eq!(
        slots_info_num(&mut c, "slots_keys_indexed"),
        total as u64 - 1
    );
    assert_eq!(slots_info_num(&mut c, "slots_nonempty_slots"), 2);

    // "INFO" with everything also includes the section.
    let all: String = redis::cmd("INFO").arg("everything").query(&mut c).unwrap();
    assert!(
        all.contains("slots_keys_indexed:"),
        "INFO everything lacks the slots section"
    );
}

#[test]
fn module_configs() {
    let s = Server::builder()
        .module_arg("step-budget-us", "250")
        .start();
    let mut c = s.conn();
    let get = |c: &mut redis::Connection, name: &str| -> String {
        let v: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(c).unwrap();
        assert_eq!(v.len(), 2, "CONFIG GET {name} -> {v:?}");
        v[1].clone()
    };
    assert_eq!(get(&mut c, "slots.hash-function"), "crc32");
    assert_eq!(get(&mut c, "slots.index-mode"), "full");
    assert_eq!(
        get(&mut c, "slots.step-budget-us"),
        "250",
        "module arg sets the config"
    );
    let all: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("slots.*")
        .query(&mut c)
        .unwrap();
    assert_eq!(all.len(), 12, "six slots.* configs: {all:?}");
    assert_eq!(get(&mut c, "slots.migrate-max-keys-per-sec"), "0");
    assert_eq!(get(&mut c, "slots.migrate-max-bytes-per-sec"), "0");
    assert_eq!(get(&mut c, "slots.migrate-max-cpu-percent"), "70");
    ok(
        &mut c,
        &["CONFIG", "SET", "slots.migrate-max-cpu-percent", "100"],
    );
    for bad in ["0", "101", "-1", "x"] {
        expect_err(
            &mut c,
            &["CONFIG", "SET", "slots.migrate-max-cpu-percent", bad],
        );
    }
    assert_eq!(get(&mut c, "slots.migrate-max-cpu-percent"), "100");

    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "1000"]);
    assert_eq!(get(&mut c, "slots.step-budget-us"), "1000");
    expect_err(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "abc"]);
    expect_err(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "-5"]);
    assert_eq!(get(&mut c, "slots.step-budget-us"), "1000");
    expect_err(&mut c, &["CONFIG", "SET", "slots.hash-function", "crc16"]);
    expect_err(
        &mut c,
        &["CONFIG", "SET", "slots.index-mode", "counts-only"],
    );
    assert_eq!(get(&mut c, "slots.hash-function"), "crc32");
    assert_eq!(slots_info_field(&mut c, "slots_hash_function"), "crc32");
}

#[test]
fn default_step_budget_is_500() {
    let s = Server::start();
    let mut c = s.conn();
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("slots.step-budget-us")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        v,
        vec!["slots.step-budget-us".to_string(), "500".to_string()]
    );
}

#[test]
fn dbs_are_indexed_separately() {
    let s = Server::start();
    let mut c0 = s.conn();
    let mut c3 = s.conn_db(3);
    set_many(&mut c0, &tagged_keys("a", 4));
    set_many(&mut c3, &tagged_keys("a", 9));
    set_many(&mut c3, &tagged_keys("b", 2));
    let sa = H.slot(b"a");
    let sb = H.slot(b"b");
    assert_eq!(slots_count(&mut c0, sa), 4);
    assert_eq!(slots_count(&mut c3, sa), 9);
    assert_eq!(slots_count(&mut c0, sb), 0);
    assert_eq!(slots_count(&mut c3, sb), 2);
    let k3: BTreeSet<Vec<u8>> = slots_keys(&mut c3, sa, 100).into_iter().collect();
    assert_eq!(k3.len(), 9);
    assert_eq!(slots_scan_all(&mut c0, sa, None).len(), 4);
    assert_eq!(slots_scan_all(&mut c3, sb, None).len(), 2);
    assert_exact_dbs(&mut c0, H, &[0, 3]);
    // SLOTS.CHECK checks all dbs, from any db.
    check(&mut c3);
    // keys_indexed counts every db (13 + 2 keys).
    assert_eq!(slots_info_num(&mut c0, "slots_keys_indexed"), 15);
}

#[test]
fn overwrites_are_not_double_counted() {
    let s = Server::start();
    let mut c = s.conn();
    for _ in 0..3 {
        ok(&mut c, &["SET", "k", "v"]);
        ok(&mut c, &["SET", "k", "w", "XX"]);
        ok(&mut c, &["SET", "k", "x", "NX"]);
        ok(&mut c, &["SETNX", "k", "y"]);
        ok(&mut c, &["MSET", "k", "1", "k2", "2"]);
        ok(&mut c, &["MSETNX", "k", "1", "k3", "2"]);
        ok(&mut c, &["INCR", "k"]);
        ok(&mut c, &["APPEND", "k", "0"]);
        ok(&mut c, &["SETRANGE", "k4", "5", "x"]);
        ok(&mut c, &["GETSET", "k4", "z"]);
        ok(&mut c, &["SET", "k5", "v", "GET"]);
    }
    assert_eq!(dbsize(&mut c), 4);
    assert_eq!(slots_info(&mut c).values().sum::<u64>(), 4);
    assert_exact(&mut c, H);
}

#[test]
fn slots_check_reports_ok_on_large_mixed_db() {
    let s = Server::start();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "POPULATE", "20000", "pop", "8"]);
    assert_eq!(dbsize(&mut c), 20000);
    // Keys created by DEBUG POPULATE bypass the commands; they are still keys.
    assert_exact(&mut c, H);
    assert_eq!(slots_info_num(&mut c, "slots_keys_indexed"), 20000);
}

#[test]
fn slots_info_pagination_covers_everything() {
    for hash in [H, HashFn::Crc16] {
        let s = if hash == H {
            Server::start()
        } else {
            Server::builder().crc16().start()
        };
        let mut c = s.conn();
        set_many(
            &mut c,
            &(0..3000).map(|i| format!("pg:{i}")).collect::<Vec<_>>(),
        );
        let all = slots_info_entries(&mut c);
        let n = hash.slot_count();
        for page in [1u32, 7, 100, 1000] {
            let mut got = Vec::new();
            let mut start = 0;
            while start < n {
                let v = ok(
                    &mut c,
                    &[
                        "SLOTS.INFO".to_string(),
                        start.to_string(),
                        page.to_string(),
                    ],
                );
                let part = parse_slots_info(&v);
                assert!(part
                    .iter()
                    .all(|e| e.slot >= start && e.slot < start + page));
                got.extend(part);
                start += page;
            }
            assert_eq!(got, all, "{hash:?}: pages of {page}");
        }
        // The top slot is addressable.
        let top = n - 1;
        let k = plain_keys_in_slot(hash, top, "top", 1);
        set_many(&mut c, &k);
        let v = ok(
            &mut c,
            &["SLOTS.INFO".to_string(), top.to_string(), "1".to_string()],
        );
        let e = parse_slots_info(&v);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].slot, top);
        assert_eq!(slots_count(&mut c, top), e[0].keys);
    }
}

#[test]
fn resp3_clients() {
    let s = Server::start();
    let client = redis::Client::open(format!("{}?protocol=resp3", s.url())).unwrap();
    let mut c = client.get_connection().unwrap();
    set_many(&mut c, &tagged_keys("r3", 5));
    let rs = H.slot(b"r3");
    assert_eq!(hashkey(&mut c, b"123456789"), 294);
    assert_eq!(slots_count(&mut c, rs), 5);
    assert_eq!(slots_info(&mut c).get(&rs), Some(&5));
    assert_eq!(slots_keys(&mut c, rs, 10).len(), 5);
    assert_eq!(slots_scan_all(&mut c, rs, None).len(), 5);
    check(&mut c);
    ok(&mut c, &["SLOTS.DEL".to_string(), rs.to_string()]);
    wait_del_done(&mut c);
    assert_eq!(slots_count(&mut c, rs), 0);
}
