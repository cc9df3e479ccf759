//! `hash-function crc16`: Redis Cluster's slot function, 16384 slots.

use std::collections::BTreeSet;

use slotfork_tests::*;

const H: HashFn = HashFn::Crc16;

fn server() -> Server {
    Server::builder().crc16().start()
}

#[test]
fn hashkey_vectors() {
    let s = server();
    let mut c = s.conn();
    assert_eq!(
        hashkey(&mut c, b"123456789"),
        0x31C3,
        "crc16(123456789)=0x31C3"
    );
    assert_eq!(hashkey(&mut c, b"foo"), 12182);
    assert_eq!(hashkey(&mut c, b"{user1000}.following"), 3443);
    assert_eq!(hashkey(&mut c, b"{user1000}.followers"), 3443);
    assert_eq!(hashkey(&mut c, b"user1000"), 3443);
    // Empty tag: cluster rule hashes the whole key.
    let whole = crc16_xmodem(b"foo{}{bar}") as u32 & 16383;
    assert_eq!(hashkey(&mut c, b"foo{}{bar}"), whole);
    assert_ne!(
        whole,
        hashkey(&mut c, b"bar"),
        "must not use the second tag"
    );
    assert_eq!(
        hashkey(&mut c, b"a{}b"),
        crc16_xmodem(b"a{}b") as u32 & 16383
    );
    assert_eq!(hashkey(&mut c, b"foo{{bar}}zap"), hashkey(&mut c, b"{bar"));
    assert_eq!(hashkey(&mut c, b"foo{bar}{zap}"), hashkey(&mut c, b"bar"));
    assert_eq!(hashkey(&mut c, b""), 0);
    for k in [b"a\0{\0x}".as_slice(), b"\xff\xff{", b"{}", b"}{", b"x{\0}"] {
        assert_eq!(hashkey(&mut c, k), H.slot(k), "{k:?}");
    }
    let v = ok(
        &mut c,
        &["SLOTS.HASHKEY", "foo", "{user1000}x", "123456789"],
    );
    let got: Vec<i64> = as_array(&v).iter().map(as_int).collect();
    assert_eq!(got, vec![12182, 3443, 0x31C3]);
}

#[test]
fn info_and_configs() {
    let s = server();
    let mut c = s.conn();
    assert_eq!(slots_info_field(&mut c, "slots_hash_function"), "crc16");
    assert_eq!(slots_info_field(&mut c, "slots_slot_count"), "16384");
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("slots.hash-function")
        .query(&mut c)
        .unwrap();
    assert_eq!(v[1], "crc16");
    // Slot range is 0..16383.
    assert_eq!(slots_count(&mut c, 16383), 0);
    assert_eq!(slots_count(&mut c, 5000), 0);
    expect_err(&mut c, &["SLOTS.COUNT", "16384"]);
    expect_err(&mut c, &["SLOTS.KEYS", "16384", "1"]);
    expect_err(&mut c, &["SLOTS.SCAN", "16384", "0"]);
    expect_err(&mut c, &["SLOTS.DEL", "16384"]);
}

#[test]
fn index_exact_under_workload() {
    let s = server();
    let mut c = s.conn();
    let keys: Vec<String> = (0..5000).map(|i| format!("user:{i}")).collect();
    set_many(&mut c, &keys);
    set_many(&mut c, &tagged_keys("user1000", 300));
    assert_exact(&mut c, H);
    assert_eq!(
        slots_count(&mut c, 3443),
        300 + keys.iter().filter(|k| H.slot(k.as_bytes()) == 3443).count() as u64
    );
    // Keys in high slots (> 1023) exist and are counted.
    let high = slots_info(&mut c).keys().filter(|&&s| s >= 1024).count();
    assert!(high > 1000, "crc16 spreads over 16384 slots");
    let mut del = vec!["DEL".to_string()];
    del.extend(keys[..2500].iter().cloned());
    ok(&mut c, &del);
    ok(&mut c, &["RENAME", "{user1000}:0", "foo"]);
    assert_eq!(
        slots_count(&mut c, 12182),
        1 + keys[2500..]
            .iter()
            .filter(|k| H.slot(k.as_bytes()) == 12182)
            .count() as u64
    );
    ok(&mut c, &["SET", "foo{}{bar}", "1"]);
    assert_eq!(
        slots_count(&mut c, H.slot(b"foo{}{bar}")),
        model_counts(&mut c, H)[&H.slot(b"foo{}{bar}")]
    );
    assert_exact(&mut c, H);

    // SLOTS.KEYS / SCAN / DEL on slot 3443.
    let k: BTreeSet<Vec<u8>> = slots_keys(&mut c, 3443, 10_000).into_iter().collect();
    assert_eq!(k.len() as u64, slots_count(&mut c, 3443));
    assert!(k.iter().all(|x| H.slot(x) == 3443));
    let sc: BTreeSet<Vec<u8>> = slots_scan_all(&mut c, 3443, Some(7)).into_iter().collect();
    assert_eq!(sc, k);
    ok(&mut c, &["SLOTS.DEL", "3443", "16383"]);
    wait_del_done(&mut c);
    assert_eq!(slots_count(&mut c, 3443), 0);
    assert_exact(&mut c, H);
}

#[test]
fn reload_keeps_crc16_index() {
    let mut s = server();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "POPULATE", "3000", "pop", "4"]);
    set_many(&mut c, &tagged_keys("user1000", 50));
    let before = slots_info(&mut c);
    drop(c);
    s.restart(Stop::ShutdownSave);
    let mut c = s.conn();
    assert_eq!(slots_info(&mut c), before);
    ok(&mut c, &["DEBUG", "RELOAD"]);
    assert_eq!(slots_info(&mut c), before);
    assert_exact(&mut c, H);
}
