//! Async migration (MIGRATION.md): every data type, small and big encodings,
//! whole-key and chunked paths, expiry and LRU/LFU, databases, hash
//! functions. Source contents before the job are compared by content with
//! the target's after it; the source must no longer hold the moved keys.

use std::time::Duration;

use slotfork_tests::migrate::*;
use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

/// Move one slot holding `populate_types(scale)` with `opts`, compare, and
/// return the final status.
fn move_every_type(opts: &[&str], scale: usize, slot: u32) -> Status {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let tag = tag_for_slot(H, slot);
    let keys = populate_types(&mut ac, &tag, scale);
    // A bystander in another slot must stay where it is.
    let other = tag_for_slot(H, (slot + 1) % 1024);
    let bystander = format!("{{{other}}}:stay");
    ok(&mut ac, &["SET", &bystander, "here"]);
    let before = snap_keys(&mut ac, &keys);
    assert_eq!(before.len(), keys.len(), "all dataset keys exist");
    let digest_before: Vec<String> = keys.iter().map(|k| digest_value(&mut ac, k)).collect();

    let st = migrate_slots_done(&a, &b, opts, &[slot]);
    assert_eq!(
        st.num("keys_moved") as usize,
        keys.len(),
        "keys_moved: {st:?}"
    );
    assert_eq!(st.num("errors"), 0, "{st:?}");

    let mut bc = b.conn();
    let after = snap_db(&mut bc);
    assert_same_data(
        &before,
        &after,
        &format!("target after SLOTS.MIGRATE {opts:?}"),
    );
    let digest_after: Vec<String> = keys.iter().map(|k| digest_value(&mut bc, k)).collect();
    assert_eq!(digest_before, digest_after, "DEBUG DIGEST-VALUE per key");
    assert!(
        staging_keys(&mut bc).is_empty(),
        "no staging key may remain on the target after a done job: {:?}",
        staging_keys(&mut bc)
    );

    // The source holds only the bystander.
    assert_eq!(
        all_keys(&mut ac),
        vec![bystander.clone().into_bytes()],
        "source keys after the job"
    );
    assert_eq!(slots_count(&mut ac, slot), 0);
    assert_eq!(slots_count(&mut bc, slot) as usize, keys.len());
    assert_exact(&mut ac, H);
    assert_exact(&mut bc, H);
    st
}

#[test]
fn every_type_whole_keys_default_options() {
    move_every_type(&[], 1, 77);
}

#[test]
fn every_type_chunked_small_maxbulks() {
    // MAXBULKS 50 / MAXBYTES 4096: every key with more than 50 elements (or
    // 4 KiB) goes as CHUNK records, streams with GROUP/CONSUMER/PENDING/
    // STREAMMETA, then COMMIT.
    let st = move_every_type(&["MAXBULKS", "50", "MAXBYTES", "4096"], 1, 78);
    assert!(st.num("big_keys") >= 6, "big_keys: {st:?}");
    assert!(
        st.num("chunks_sent") > st.num("big_keys"),
        "chunks_sent: {st:?}"
    );
}

#[test]
fn every_type_big_encodings_chunked() {
    // scale 30: lists/sets/hashes of 15k-21k elements, a 9k-entry stream
    // with groups and PELs, a 300 KB string.
    let st = move_every_type(&["MAXBULKS", "100", "MAXBYTES", "65536"], 30, 79);
    assert!(st.num("big_keys") >= 7, "big_keys: {st:?}");
    assert!(st.num("chunks_sent") >= 100, "chunks_sent: {st:?}");
}

#[test]
fn every_type_big_encodings_whole_keys() {
    // Same big keys with the defaults raised so that no key is chunked.
    move_every_type(&["MAXBULKS", "1000000", "MAXBYTES", "100000000"], 30, 80);
}

#[test]
fn every_type_parallel_connections() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slots = [3u32, 400, 401, 1023];
    let mut keys = Vec::new();
    for &s in &slots {
        keys.extend(populate_types(&mut ac, &tag_for_slot(H, s), 2));
        set_many(&mut ac, &plain_keys_in_slot(H, s, "plain", 50));
        keys.extend(plain_keys_in_slot(H, s, "plain", 50));
    }
    let before = snap_keys(&mut ac, &keys);
    let st = migrate_slots_done(&a, &b, &["PARALLEL", "4", "MAXBULKS", "64"], &slots);
    assert_eq!(st.num("keys_moved") as usize, keys.len(), "{st:?}");
    let mut bc = b.conn();
    assert_same_data(&before, &snap_db(&mut bc), "PARALLEL 4");
    assert_eq!(dbsize(&mut ac), 0);
    assert_exact(&mut ac, H);
    assert_exact(&mut bc, H);
}

#[test]
fn crc16_servers() {
    let a = Server::builder().crc16().start();
    let b = Server::builder().crc16().start();
    let mut ac = a.conn();
    let slot = 12182; // slot of "foo" in Redis Cluster
    let tag = tag_for_slot(HashFn::Crc16, slot);
    let mut keys = populate_types(&mut ac, &tag, 1);
    ok(&mut ac, &["SET", "foo", "bar"]);
    keys.push("foo".into());
    ok(&mut ac, &["SET", "bar", "stays"]);
    let before = snap_keys(&mut ac, &keys);
    let st = migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &[slot]);
    assert_eq!(st.num("keys_moved") as usize, keys.len(), "{st:?}");
    let mut bc = b.conn();
    assert_same_data(&before, &snap_db(&mut bc), "crc16");
    assert_eq!(all_keys(&mut ac), vec![b"bar".to_vec()]);
    assert_exact(&mut ac, HashFn::Crc16);
    assert_exact(&mut bc, HashFn::Crc16);
}

#[test]
fn job_uses_callers_database() {
    let a = Server::start();
    let b = Server::start();
    let slot = 11;
    let tag = tag_for_slot(H, slot);
    let mut a0 = a.conn();
    ok(&mut a0, &["SET", &format!("{{{tag}}}:db0"), "zero"]);
    let mut a7 = a.conn_db(7);
    let keys = populate_types(&mut a7, &tag, 1);
    let before = snap_keys(&mut a7, &keys);
    let id = migrate_slots(&mut a7, b.port, &["MAXBULKS", "100"], &[slot]);
    let st = finish_done(&a, id);
    assert_eq!(st.get("db"), "7", "{st:?}");
    assert_eq!(st.num("keys_moved") as usize, keys.len());
    let mut b7 = b.conn_db(7);
    assert_same_data(&before, &snap_db(&mut b7), "db 7");
    assert_eq!(dbsize(&mut b.conn()), 0, "target db 0 untouched");
    assert_eq!(dbsize(&mut a7), 0, "source db 7 emptied");
    assert_eq!(
        all_keys(&mut a0),
        vec![format!("{{{tag}}}:db0").into_bytes()],
        "source db 0 untouched (same slot, other db)"
    );
    assert_exact_dbs(&mut a.conn(), H, &[0, 7]);
    assert_exact_dbs(&mut b.conn(), H, &[0, 7]);
}

#[test]
fn ttl_absolute_expiry_and_persistence() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let slot = 21;
    let keys = tagged_keys(&tag_for_slot(H, slot), 60);
    set_many(&mut ac, &keys);
    let base = now_ms() + 7_200_000;
    for (i, k) in keys.iter().enumerate() {
        if i % 3 == 0 {
            ok(
                &mut ac,
                &["PEXPIREAT", k, &(base + i as i64 * 37).to_string()],
            );
        }
    }
    let before = snap_keys(&mut ac, &keys);
    let st = migrate_slots_done(&a, &b, &[], &[slot]);
    assert_eq!(st.num("keys_moved"), 60);
    let mut bc = b.conn();
    for (i, k) in keys.iter().enumerate() {
        let t = as_int(&ok(&mut bc, &["PEXPIRETIME", k]));
        if i % 3 == 0 {
            assert_eq!(
                t,
                base + i as i64 * 37,
                "{k}: absolute expiry preserved to the ms"
            );
        } else {
            assert_eq!(t, -1, "{k}: a key without TTL stays persistent");
        }
    }
    assert_same_data(&before, &snap_db(&mut bc), "ttl");
}

#[test]
fn expired_keys_are_not_resurrected() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    // Keep logically expired keys in the source's keyspace, and let the
    // target count whatever it creates (no active expiry on either side).
    ok(&mut ac, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    ok(&mut bc, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    let slot = 22;
    let tag = tag_for_slot(H, slot);
    let live = tagged_keys(&tag, 20);
    set_many(&mut ac, &live);
    let dead: Vec<String> = (0..20).map(|i| format!("{{{tag}}}:dead{i}")).collect();
    for (i, k) in dead.iter().enumerate() {
        match i % 4 {
            0 => ok(&mut ac, &["SET", k, "x", "PX", "1"]),
            1 => ok(&mut ac, &["RPUSH", k, "a", "b"]),
            2 => ok(&mut ac, &["HSET", k, "f", "v"]),
            _ => ok(&mut ac, &["ZADD", k, "1", "m"]),
        };
        if i % 4 != 0 {
            ok(&mut ac, &["PEXPIRE", k, "1"]);
        }
    }
    // A big key that expires: chunked path.
    let big_dead = format!("{{{tag}}}:bigdead");
    fill_big(&mut ac, &big_dead, "hash", 3000);
    ok(&mut ac, &["PEXPIRE", &big_dead, "1"]);
    std::thread::sleep(Duration::from_millis(20));
    let st = migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &[slot]);
    assert!(st.num("keys_moved") >= 20, "{st:?}");
    for k in dead.iter().chain(std::iter::once(&big_dead)) {
        assert_eq!(
            as_int(&ok(&mut bc, &["EXISTS", k])),
            0,
            "{k} had expired on the source and must not exist on the target"
        );
    }
    // DBSIZE counts keys not yet reclaimed: the target must not have created
    // any expired key at all.
    assert_eq!(
        dbsize(&mut bc),
        20,
        "target created keys beyond the 20 live ones: {:?}",
        all_keys(&mut bc)
    );
    assert!(staging_keys(&mut bc).is_empty());
    ok(&mut bc, &["DEBUG", "SET-ACTIVE-EXPIRE", "1"]);
    assert_exact(&mut bc, H);
}

#[test]
fn keys_expiring_during_a_slow_job() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = 23;
    let tag = tag_for_slot(H, slot);
    let keys = tagged_keys(&tag, 40);
    set_many(&mut ac, &keys);
    // Half of the keys expire 300 ms from now, while the job (10 keys/s)
    // is still running.
    let at = now_ms() + 300;
    for k in keys.iter().step_by(2) {
        ok(&mut ac, &["PEXPIREAT", k, &at.to_string()]);
    }
    throttle(&mut ac, 10, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[slot]);
    let st = finish(&a, id);
    assert_eq!(st.state(), "done", "{st:?}");
    // After the expiry time, none of those keys exists anywhere.
    wait_until(Duration::from_secs(5), "expiry time passed", || {
        now_ms() > at + 50
    });
    for k in keys.iter().step_by(2) {
        assert_eq!(as_int(&ok(&mut bc, &["EXISTS", k])), 0, "{k} target");
        assert_eq!(as_int(&ok(&mut ac, &["EXISTS", k])), 0, "{k} source");
    }
    for k in keys.iter().skip(1).step_by(2) {
        assert_eq!(as_string(&ok(&mut bc, &["GET", k])), "v", "{k} on target");
        assert_eq!(as_int(&ok(&mut bc, &["PEXPIRETIME", k])), -1);
    }
    assert_eq!(dbsize(&mut ac), 0);
}

#[test]
fn lfu_frequency_carried() {
    let cfg = "maxmemory-policy allkeys-lfu";
    let a = Server::builder().config(cfg).start();
    let b = Server::builder().config(cfg).start();
    let helper = Server::builder().without_module().start();
    let mut hc = helper.conn();
    ok(&mut hc, &["SET", "s", "value"]);
    ok(&mut hc, &["RPUSH", "l", "a", "b"]);
    let ps = dump(&mut hc, "s");
    let pl = dump(&mut hc, "l");
    let mut ac = a.conn();
    let slot = 31;
    let tag = tag_for_slot(H, slot);
    let freqs = [0u32, 1, 5, 20, 100, 200, 255];
    let mut keys = Vec::new();
    for (i, f) in freqs.iter().enumerate() {
        let k = format!("{{{tag}}}:f{f}");
        let p = if i % 2 == 0 { &ps } else { &pl };
        ok(
            &mut ac,
            &[
                b"RESTORE".as_slice(),
                k.as_bytes(),
                b"0",
                p,
                b"FREQ",
                f.to_string().as_bytes(),
            ],
        );
        keys.push(k);
    }
    // A big key (chunked path: the frequency travels in COMMIT).
    let big = format!("{{{tag}}}:bigfreq");
    fill_big(&mut ac, &big, "zset", 3000);
    let pb = dump(&mut ac, &big);
    ok(
        &mut ac,
        &[
            b"RESTORE".as_slice(),
            big.as_bytes(),
            b"0",
            &pb,
            b"REPLACE",
            b"FREQ",
            b"150",
        ],
    );
    keys.push(big);
    let src: Vec<i64> = keys
        .iter()
        .map(|k| as_int(&ok(&mut ac, &["OBJECT", "FREQ", k])))
        .collect();
    migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &[slot]);
    let mut bc = b.conn();
    for (k, s) in keys.iter().zip(src) {
        let t = as_int(&ok(&mut bc, &["OBJECT", "FREQ", k]));
        assert!(
            (t - s).abs() <= 2,
            "{k}: OBJECT FREQ on the target {t}, on the source before the job {s} (FREQ must be carried)"
        );
    }
}

#[test]
fn lru_idle_time_carried() {
    let cfg = "maxmemory-policy allkeys-lru";
    let a = Server::builder().config(cfg).start();
    let b = Server::builder().config(cfg).start();
    let helper = Server::builder().without_module().start();
    let mut hc = helper.conn();
    ok(&mut hc, &["HSET", "h", "f", "v"]);
    let p = dump(&mut hc, "h");
    let mut ac = a.conn();
    let slot = 32;
    let tag = tag_for_slot(H, slot);
    let idles = [10_000u64, 100_000, 1_000_000];
    let mut keys = Vec::new();
    for i in idles {
        let k = format!("{{{tag}}}:idle{i}");
        ok(
            &mut ac,
            &[
                b"RESTORE".as_slice(),
                k.as_bytes(),
                b"0",
                &p,
                b"IDLETIME",
                i.to_string().as_bytes(),
            ],
        );
        keys.push(k);
    }
    // A big key (chunked path) with an idle time too.
    let big = format!("{{{tag}}}:bigidle");
    fill_big(&mut ac, &big, "set", 2000);
    let pb = as_bytes(&ok(&mut ac, &["DUMP", &big]));
    ok(
        &mut ac,
        &[
            b"RESTORE".as_slice(),
            big.as_bytes(),
            b"0",
            &pb,
            b"REPLACE",
            b"IDLETIME",
            b"50000",
        ],
    );
    let t0 = std::time::Instant::now();
    migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &[slot]);
    let elapsed = t0.elapsed().as_secs() as i64 + 3;
    let mut bc = b.conn();
    for (k, i) in keys
        .iter()
        .zip(idles)
        .chain(std::iter::once((&big, 50_000u64)))
    {
        let t = as_int(&ok(&mut bc, &["OBJECT", "IDLETIME", k]));
        assert!(
            t >= i as i64 - 2 && t <= i as i64 + elapsed,
            "{k}: OBJECT IDLETIME on the target {t}, expected about {i} (idle time must be carried, not reset by the job)"
        );
    }
}

/// Harness self-check, independent of the module's migration: copying the
/// dataset with DUMP / RESTORE ... ABSTTL gives equal snapshots, and a
/// changed element, score, TTL or stream PEL is detected.
#[test]
fn snapshot_comparison_self_check() {
    let a = Server::builder().without_module().start();
    let b = Server::builder().without_module().start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let keys = populate_types(&mut ac, "self", 2);
    let before = snap_keys(&mut ac, &keys);
    assert_eq!(before.len(), keys.len());
    for k in &keys {
        let p = dump(&mut ac, k);
        let at = as_int(&ok(&mut ac, &["PEXPIRETIME", k]));
        let ttl = if at < 0 { 0 } else { at };
        ok(
            &mut bc,
            &[
                b"RESTORE".as_slice(),
                k.as_bytes(),
                ttl.to_string().as_bytes(),
                &p,
                b"ABSTTL",
            ],
        );
    }
    assert_same_data(&before, &snap_db(&mut bc), "DUMP/RESTORE copy");
    let changes: Vec<Vec<&str>> = vec![
        vec!["ZADD", "{self}:zset:small", "0.10000000000000002", "sm7"],
        vec!["HSET", "{self}:hash:big", "field:5", "other"],
        vec!["PEXPIRE", "{self}:str:raw", "99999999"],
        vec!["PERSIST", "{self}:list:small"],
        vec!["XACK", "{self}:stream:big", "g3", "0-0"],
        vec!["XSETID", "{self}:stream:small", "100-0"],
        vec!["SETRANGE", "{self}:str:big", "19999", "x"],
        vec!["LSET", "{self}:list:big", "600", "changed"],
        vec!["SREM", "{self}:set:big-intset", "-1000000"],
    ];
    for ch in changes {
        let k = ch[1].as_bytes().to_vec();
        let old = snap_key(&mut bc, &k).unwrap();
        ok(&mut bc, &ch);
        let new = snap_key(&mut bc, &k).unwrap();
        if ch[0] == "XACK" {
            continue; // acking an id not pending changes nothing
        }
        assert!(
            !key_diff(&old, &new, 10_000).is_empty(),
            "{ch:?} not detected by the snapshot comparison"
        );
    }
    // A PEL change is detected too.
    let k = b"{self}:stream:big".to_vec();
    let old = snap_key(&mut bc, &k).unwrap();
    let pend = ok(
        &mut bc,
        &["XPENDING", "{self}:stream:big", "g1", "-", "+", "1"],
    );
    let id = as_string(&as_array(&as_array(&pend)[0])[0]);
    ok(&mut bc, &["XACK", "{self}:stream:big", "g1", &id]);
    let new = snap_key(&mut bc, &k).unwrap();
    assert!(
        !key_diff(&old, &new, 10_000).is_empty(),
        "XACK not detected"
    );
}

/// A consumer group's PEL may hold ids whose stream entries were deleted
/// (XREADGROUP, then XDEL). DUMP/RESTORE keeps them; the chunked path
/// (PENDING records) must keep them too.
#[test]
fn stream_pel_entry_of_a_deleted_entry() {
    for opts in [&[][..], &["MAXBULKS", "10"][..]] {
        let a = Server::start();
        let b = Server::start();
        let mut ac = a.conn();
        let slot = 90;
        let key = format!("{{{}}}:s", tag_for_slot(H, slot));
        fill_big(&mut ac, &key, "stream", 100);
        decorate_stream(&mut ac, &key, 100, true);
        let before = snap_db(&mut ac);
        let Content::Stream(s) = &before[key.as_bytes()].content else {
            panic!()
        };
        let g1 = &s.groups[0];
        assert!(
            g1.pending
                .iter()
                .any(|p| !s.entries.iter().any(|e| e.0 == p.id)),
            "setup: g1's PEL holds a deleted entry"
        );
        migrate_slots_done(&a, &b, opts, &[slot]);
        assert_same_data(
            &before,
            &snap_db(&mut b.conn()),
            &format!("stream with a PEL entry of a deleted entry, options {opts:?}"),
        );
    }
}
