//! SLOTS.RESTORE, the target side of wire protocol version 1
//! (MIGRATION.md), driven by hand-built batches: validation (any bad record
//! -> -ERR and the batch changes nothing), record semantics and replies
//! (1 applied, 0 nothing to do, -1 restart), idempotence, staging keys.
//! Valid DUMP payloads come from the real DUMP of a helper server.

use slotfork_tests::migrate::*;
use slotfork_tests::*;

struct Fixture {
    t: Server,
    _helper: Server,
    /// DUMP payloads: string "hello", list [a b c], hash {f: v}, zset {m: 1.5}.
    ps: Vec<u8>,
    pl: Vec<u8>,
    ph: Vec<u8>,
    pz: Vec<u8>,
}

fn fixture() -> Fixture {
    let helper = Server::builder().without_module().start();
    let mut hc = helper.conn();
    ok(&mut hc, &["SET", "s", "hello"]);
    ok(&mut hc, &["RPUSH", "l", "a", "b", "c"]);
    ok(&mut hc, &["HSET", "h", "f", "v"]);
    ok(&mut hc, &["ZADD", "z", "1.5", "m"]);
    let t = Server::start();
    let mut tc = t.conn();
    // Existing data that must survive every rejected batch.
    set_many(
        &mut tc,
        &(0..50).map(|i| format!("pre:{i}")).collect::<Vec<_>>(),
    );
    ok(&mut tc, &["RPUSH", "prelist", "x", "y"]);
    ok(&mut tc, &["HSET", "prehash", "a", "b"]);
    ok(&mut tc, &["SET", "k", "old"]);
    Fixture {
        ps: dump(&mut hc, "s"),
        pl: dump(&mut hc, "l"),
        ph: dump(&mut hc, "h"),
        pz: dump(&mut hc, "z"),
        t,
        _helper: helper,
    }
}

fn state(c: &mut redis::Connection) -> (u64, String, Vec<Vec<u8>>) {
    (dbsize(c), digest(c), all_keys(c))
}

fn raw(c: &mut redis::Connection, args: &[Vec<u8>]) -> redis::RedisResult<redis::Value> {
    run(c, args)
}

fn ints(v: &redis::Value) -> Vec<i64> {
    as_array(v).iter().map(as_int).collect()
}

#[test]
fn crc64_matches_dump_payloads() {
    assert_eq!(
        crc64(b"123456789"),
        0xe9c6d914c4b8d9ca,
        "CRC-64/Jones check value"
    );
    let f = fixture();
    for p in [&f.ps, &f.pl, &f.ph, &f.pz] {
        let n = p.len();
        let want = u64::from_le_bytes(p[n - 8..].try_into().unwrap());
        assert_eq!(crc64(&p[..n - 8]), want, "trailing CRC64 of a DUMP payload");
        let ver = u16::from_le_bytes([p[n - 10], p[n - 9]]);
        assert!((9..=12).contains(&ver), "RDB version {ver}");
    }
}

#[test]
fn dump_records_expiry_and_lru() {
    let f = fixture();
    let mut c = f.t.conn();
    let at = now_ms() + 3_600_000 + 17;
    let r = restore_ok(
        &mut c,
        "src-1",
        &[
            rec(&[b"DUMP", b"k", b"0", b"-", b"0", &f.ps]),
            rec(&[b"DUMP", b"kl", at.to_string().as_bytes(), b"-", b"0", &f.pl]),
            rec(&[b"DUMP", b"kh", b"0", b"IDLE", b"5000", &f.ph]),
            rec(&[b"DUMP", b"kz", b"0", b"-", b"0", &f.pz]),
        ],
    );
    assert_eq!(r, vec![1, 1, 1, 1]);
    assert_eq!(
        as_string(&ok(&mut c, &["GET", "k"])),
        "hello",
        "DUMP replaces an existing key"
    );
    assert_eq!(as_int(&ok(&mut c, &["PEXPIRETIME", "k"])), -1);
    assert_eq!(
        as_int(&ok(&mut c, &["PEXPIRETIME", "kl"])),
        at,
        "abs-expire-ms exact"
    );
    assert!(as_int(&ok(&mut c, &["OBJECT", "IDLETIME", "kh"])) >= 4999);
    assert_eq!(
        as_string(&as_array(&ok(&mut c, &["ZRANGE", "kz", "0", "-1", "WITHSCORES"]))[1]),
        "1.5"
    );
    // Same batch again: same final state (RESTORE ... REPLACE).
    let s0 = state(&mut c);
    let r = restore_ok(
        &mut c,
        "src-1",
        &[
            rec(&[b"DUMP", b"k", b"0", b"-", b"0", &f.ps]),
            rec(&[b"DUMP", b"kl", at.to_string().as_bytes(), b"-", b"0", &f.pl]),
        ],
    );
    assert_eq!(r, vec![1, 1]);
    assert_eq!(state(&mut c), s0);
    // An expiry in the past deletes the key and creates nothing.
    let r = restore_ok(
        &mut c,
        "src-1",
        &[
            rec(&[
                b"DUMP",
                b"k",
                (now_ms() - 1000).to_string().as_bytes(),
                b"-",
                b"0",
                &f.ps,
            ]),
            rec(&[b"DUMP", b"never", b"1", b"-", b"0", &f.ps]),
        ],
    );
    assert_eq!(r, vec![0, 0], "expired records: nothing to do");
    assert_eq!(
        as_int(&ok(&mut c, &["EXISTS", "k", "never"])),
        0,
        "no resurrection"
    );
    check(&mut c);
}

#[test]
fn lfu_record_sets_frequency() {
    let helper = Server::builder().without_module().start();
    let mut hc = helper.conn();
    ok(&mut hc, &["SET", "s", "x"]);
    let p = dump(&mut hc, "s");
    let t = Server::builder()
        .config("maxmemory-policy allkeys-lfu")
        .start();
    let mut c = t.conn();
    let r = restore_ok(
        &mut c,
        "lfu",
        &[rec(&[b"DUMP", b"f", b"0", b"FREQ", b"77", &p])],
    );
    assert_eq!(r, vec![1]);
    let f = as_int(&ok(&mut c, &["OBJECT", "FREQ", "f"]));
    assert!((76..=78).contains(&f), "OBJECT FREQ {f}, want 77");
}

#[test]
fn restores_into_the_selected_database() {
    let f = fixture();
    let mut c = f.t.conn_db(3);
    assert_eq!(
        restore_ok(
            &mut c,
            "db3",
            &[rec(&[b"DUMP", b"in3", b"0", b"-", b"0", &f.ps])]
        ),
        vec![1]
    );
    assert_eq!(as_string(&ok(&mut c, &["GET", "in3"])), "hello");
    assert_eq!(as_int(&ok(&mut f.t.conn(), &["EXISTS", "in3"])), 0);
}

/// Every batch here is invalid somewhere: -ERR and no change at all.
#[test]
fn invalid_batches_are_rejected_whole() {
    let f = fixture();
    let mut c = f.t.conn();
    let s0 = state(&mut c);
    let good = rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", &f.ps]);
    let n = f.ps.len();
    let mut truncated = f.ps.clone();
    truncated.truncate(n - 3);
    let short = f.ps[..5].to_vec();
    let mut crc_flip = f.ps.clone();
    crc_flip[n - 1] ^= 0xff;
    let mut body_flip = f.ps.clone();
    body_flip[2] ^= 0x01;
    let mut newer = f.ps.clone();
    newer[n - 10] = 0xff;
    newer[n - 9] = 0x00;
    fix_dump_crc(&mut newer);
    // RDB 12 (Redis 7.4+): neither Redis 7.0 (10) nor Valkey 8 (11) loads
    // it; Valkey reports its own version to modules, so this also checks
    // that the target detected the server it runs in.
    let mut rdb12 = f.ps.clone();
    rdb12[n - 10] = 12;
    rdb12[n - 9] = 0x00;
    fix_dump_crc(&mut rdb12);
    let mut bad_type = f.ps.clone();
    bad_type[0] = 0xee;
    fix_dump_crc(&mut bad_type);

    let b = |parts: &[&[u8]]| -> Vec<Vec<u8>> { parts.iter().map(|p| p.to_vec()).collect() };
    let long_id = "x".repeat(65);
    let mut cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "version 2",
            restore_args("2", "src", std::slice::from_ref(&good)),
        ),
        (
            "version 0",
            restore_args("0", "src", std::slice::from_ref(&good)),
        ),
        (
            "version x",
            restore_args("x", "src", std::slice::from_ref(&good)),
        ),
        (
            "source-id with a space",
            restore_args("1", "bad id", std::slice::from_ref(&good)),
        ),
        (
            "source-id of 65 chars",
            restore_args("1", &long_id, std::slice::from_ref(&good)),
        ),
        (
            "empty source-id",
            restore_args("1", "", std::slice::from_ref(&good)),
        ),
        (
            // Staging names are prefix:source:key; "a:b" + "c" would be
            // "a" + "b:c".
            "source-id with a colon",
            restore_args("1", "a:b", std::slice::from_ref(&good)),
        ),
        (
            "source-id with a slash",
            restore_args("1", "a/b", std::slice::from_ref(&good)),
        ),
        (
            "source-id with braces",
            restore_args("1", "{x}", std::slice::from_ref(&good)),
        ),
        ("no arguments", b(&[b"SLOTS.RESTORE"])),
        ("no records, no count", b(&[b"SLOTS.RESTORE", b"1", b"src"])),
        (
            "count not an integer",
            b(&[
                b"SLOTS.RESTORE",
                b"1",
                b"src",
                b"one",
                b"DUMP",
                b"newkey",
                b"0",
                b"-",
                b"0",
                &f.ps,
            ]),
        ),
        (
            "negative count",
            b(&[
                b"SLOTS.RESTORE",
                b"1",
                b"src",
                b"-1",
                b"DUMP",
                b"newkey",
                b"0",
                b"-",
                b"0",
                &f.ps,
            ]),
        ),
        (
            "count 2, one record",
            b(&[
                b"SLOTS.RESTORE",
                b"1",
                b"src",
                b"2",
                b"DUMP",
                b"newkey",
                b"0",
                b"-",
                b"0",
                &f.ps,
            ]),
        ),
        (
            "count 1, trailing arguments",
            b(&[
                b"SLOTS.RESTORE",
                b"1",
                b"src",
                b"1",
                b"DUMP",
                b"newkey",
                b"0",
                b"-",
                b"0",
                &f.ps,
                b"extra",
            ]),
        ),
        (
            "huge count",
            b(&[
                b"SLOTS.RESTORE",
                b"1",
                b"src",
                b"1000000000",
                b"DUMP",
                b"newkey",
                b"0",
                b"-",
                b"0",
                &f.ps,
            ]),
        ),
        (
            "unknown opcode",
            restore_args("1", "src", &[rec(&[b"FROB", b"newkey"])]),
        ),
        (
            "DUMP missing payload",
            restore_args("1", "src", &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0"])]),
        ),
        (
            "DUMP expire not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"soon", b"-", b"0", &f.ps])],
            ),
        ),
        (
            "DUMP expire fractional",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"1.5", b"-", b"0", &f.ps])],
            ),
        ),
        (
            "DUMP unknown lru-kind",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"LFU", b"3", &f.ps])],
            ),
        ),
        (
            "DUMP IDLE not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"IDLE", b"x", &f.ps])],
            ),
        ),
        (
            "DUMP FREQ not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"FREQ", b"x", &f.ps])],
            ),
        ),
        (
            "DUMP FREQ out of range",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"FREQ", b"256", &f.ps])],
            ),
        ),
        (
            "truncated payload",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", &truncated])],
            ),
        ),
        (
            "5-byte payload",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", &short])],
            ),
        ),
        (
            "empty payload",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", b""])],
            ),
        ),
        (
            "flipped CRC byte",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", &crc_flip])],
            ),
        ),
        (
            "flipped body byte",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", &body_flip])],
            ),
        ),
        (
            "RDB version newer than the server",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", &newer])],
            ),
        ),
        (
            "bad type byte",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", &bad_type])],
            ),
        ),
        (
            "CHUNK unknown type",
            restore_args(
                "1",
                "src",
                &[rec(&[b"CHUNK", b"newkey", b"blob", b"0", b"1", b"x"])],
            ),
        ),
        (
            "CHUNK offset not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[b"CHUNK", b"newkey", b"list", b"zero", b"1", b"x"])],
            ),
        ),
        (
            "CHUNK negative offset",
            restore_args(
                "1",
                "src",
                &[rec(&[b"CHUNK", b"newkey", b"list", b"-1", b"1", b"x"])],
            ),
        ),
        (
            "CHUNK count not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"CHUNK", b"newkey", b"list", b"0", b"two", b"x", b"y",
                ])],
            ),
        ),
        (
            "CHUNK count larger than the elements",
            restore_args(
                "1",
                "src",
                &[rec(&[b"CHUNK", b"newkey", b"list", b"0", b"3", b"x", b"y"])],
            ),
        ),
        (
            "CHUNK hash with half a pair",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"CHUNK", b"newkey", b"hash", b"0", b"2", b"f1", b"v1", b"f2",
                ])],
            ),
        ),
        (
            "CHUNK string count 2",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"CHUNK", b"newkey", b"string", b"0", b"2", b"ab", b"cd",
                ])],
            ),
        ),
        (
            "CHUNK zset bad score",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"CHUNK", b"newkey", b"zset", b"0", b"1", b"abc", b"m",
                ])],
            ),
        ),
        (
            "CHUNK zset NaN score",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"CHUNK", b"newkey", b"zset", b"0", b"1", b"nan", b"m",
                ])],
            ),
        ),
        (
            "CHUNK stream bad id",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"CHUNK", b"newkey", b"stream", b"0", b"1", b"1-x", b"1", b"f", b"v",
                ])],
            ),
        ),
        (
            "CHUNK stream nfields not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"CHUNK", b"newkey", b"stream", b"0", b"1", b"1-1", b"one", b"f", b"v",
                ])],
            ),
        ),
        (
            "GROUP bad id",
            restore_args(
                "1",
                "src",
                &[rec(&[b"GROUP", b"newkey", b"g", b"nope", b"0"])],
            ),
        ),
        (
            "GROUP entries-read not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[b"GROUP", b"newkey", b"g", b"1-0", b"x"])],
            ),
        ),
        (
            "GROUP missing argument",
            restore_args("1", "src", &[rec(&[b"GROUP", b"newkey", b"g", b"1-0"])]),
        ),
        (
            "CONSUMER missing argument",
            restore_args("1", "src", &[rec(&[b"CONSUMER", b"newkey", b"g"])]),
        ),
        (
            "PENDING count mismatch",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"PENDING", b"newkey", b"g", b"2", b"1-1", b"alice", b"10", b"1",
                ])],
            ),
        ),
        (
            "PENDING bad idle",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"PENDING", b"newkey", b"g", b"1", b"1-1", b"alice", b"idle", b"1",
                ])],
            ),
        ),
        (
            "PENDING bad deliveries",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"PENDING", b"newkey", b"g", b"1", b"1-1", b"alice", b"10", b"many",
                ])],
            ),
        ),
        (
            "PENDING bad id",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"PENDING", b"newkey", b"g", b"1", b"x-1", b"alice", b"10", b"1",
                ])],
            ),
        ),
        (
            "STREAMMETA bad id",
            restore_args(
                "1",
                "src",
                &[rec(&[b"STREAMMETA", b"newkey", b"last", b"1", b"0-0"])],
            ),
        ),
        (
            "STREAMMETA bad entries-added",
            restore_args(
                "1",
                "src",
                &[rec(&[b"STREAMMETA", b"newkey", b"5-0", b"x", b"0-0"])],
            ),
        ),
        (
            "COMMIT unknown type",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"COMMIT", b"newkey", b"blob", b"1", b"0", b"-", b"0",
                ])],
            ),
        ),
        (
            "COMMIT length not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"COMMIT", b"newkey", b"list", b"x", b"0", b"-", b"0",
                ])],
            ),
        ),
        (
            "COMMIT expire not integer",
            restore_args(
                "1",
                "src",
                &[rec(&[
                    b"COMMIT", b"newkey", b"list", b"1", b"x", b"-", b"0",
                ])],
            ),
        ),
        (
            "COMMIT missing lru",
            restore_args(
                "1",
                "src",
                &[rec(&[b"COMMIT", b"newkey", b"list", b"1", b"0"])],
            ),
        ),
        (
            "ABORT missing key",
            restore_args("1", "src", &[rec(&[b"ABORT"])]),
        ),
        // A valid record followed by a bad one: nothing is applied.
        (
            "valid DUMP then bad CRC",
            restore_args(
                "1",
                "src",
                &[
                    good.clone(),
                    rec(&[b"DUMP", b"k", b"0", b"-", b"0", &crc_flip]),
                ],
            ),
        ),
        (
            "valid DUMP over k then unknown opcode",
            restore_args(
                "1",
                "src",
                &[
                    rec(&[b"DUMP", b"k", b"0", b"-", b"0", &f.pl]),
                    rec(&[b"NOPE"]),
                ],
            ),
        ),
        (
            "valid CHUNK then bad type byte",
            restore_args(
                "1",
                "src",
                &[
                    rec(&[b"CHUNK", b"newkey", b"list", b"0", b"1", b"x"]),
                    rec(&[b"DUMP", b"k", b"0", b"-", b"0", &bad_type]),
                ],
            ),
        ),
        (
            "valid CHUNK+COMMIT then count mismatch",
            restore_args(
                "1",
                "src",
                &[
                    rec(&[b"CHUNK", b"prelist", b"list", b"0", b"1", b"z"]),
                    rec(&[b"COMMIT", b"prelist", b"list", b"1", b"0", b"-", b"0"]),
                    rec(&[b"CHUNK", b"newkey", b"hash", b"0", b"2", b"f", b"v"]),
                ],
            ),
        ),
        (
            "valid DUMPs then newer RDB version",
            restore_args(
                "1",
                "src",
                &[
                    good.clone(),
                    rec(&[b"DUMP", b"k", b"0", b"-", b"0", &f.pz]),
                    rec(&[b"DUMP", b"k2", b"0", b"-", b"0", &newer]),
                ],
            ),
        ),
    ];
    // The server's own DUMP version: below 12 (Redis 7.0, Valkey 8), an RDB
    // 12 payload must be refused too.
    if u16::from_le_bytes([f.ps[n - 10], f.ps[n - 9]]) < 12 {
        cases.push((
            "RDB 12 payload (Redis 7.4+) on a server that loads at most 11",
            restore_args(
                "1",
                "src",
                &[rec(&[b"DUMP", b"newkey", b"0", b"-", b"0", &rdb12])],
            ),
        ));
    }
    for (what, args) in &cases {
        match raw(&mut c, args) {
            Ok(v) => panic!(
                "{what}: SLOTS.RESTORE accepted an invalid batch: {v:?}\n{:?}",
                printable(args)
            ),
            Err(e) => {
                assert!(
                    !e.is_io_error() && !e.is_connection_dropped(),
                    "{what}: connection error (server crash?): {e}"
                );
                let t = err_text(&e);
                assert!(t.starts_with("ERR"), "{what}: expected -ERR, got -{t}");
            }
        }
        let s = state(&mut c);
        assert!(
            s == s0,
            "{what}: the rejected batch changed the dataset: keys now {:?}",
            s.2.iter().map(|k| show(k)).collect::<Vec<_>>()
        );
        assert!(
            staging_keys(&mut c).is_empty(),
            "{what}: a staging key was created"
        );
    }
    f.t.conn(); // still alive
    check(&mut c);
}

#[test]
fn chunked_list_string_hash_set_zset() {
    let f = fixture();
    let mut c = f.t.conn();
    let sid = "job-7";
    // List in two chunks, then COMMIT.
    let batch = vec![
        rec(&[b"CHUNK", b"L", b"list", b"0", b"3", b"a", b"b", b"c"]),
        rec(&[b"CHUNK", b"L", b"list", b"3", b"2", b"d", b"e"]),
        rec(&[b"COMMIT", b"L", b"list", b"5", b"0", b"-", b"0"]),
    ];
    assert_eq!(restore_ok(&mut c, sid, &batch), vec![1, 1, 1]);
    let lr = |c: &mut redis::Connection, k: &str| -> Vec<String> {
        as_array(&ok(c, &["LRANGE", k, "0", "-1"]))
            .iter()
            .map(as_string)
            .collect()
    };
    assert_eq!(lr(&mut c, "L"), ["a", "b", "c", "d", "e"]);
    assert!(
        staging_keys(&mut c).is_empty(),
        "COMMIT renames the staging key away"
    );
    // The same batch again: same state; each reply 1 or 0.
    let s0 = state(&mut c);
    let r = restore_ok(&mut c, sid, &batch);
    assert!(
        r.iter().all(|&x| x == 0 || x == 1),
        "retried batch replies {r:?}"
    );
    assert_eq!(
        state(&mut c),
        s0,
        "retrying a batch gives the same final state"
    );

    // A duplicate list chunk is recognised by its offset.
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"M", b"list", b"0", b"2", b"a", b"b"])]
        ),
        vec![1]
    );
    let st = staging_keys(&mut c);
    assert_eq!(
        st,
        vec![format!("slotfork:staging:{sid}:M").into_bytes()],
        "staging key name"
    );
    let pttl = as_int(&ok(&mut c, &[b"PTTL".as_slice(), &st[0]]));
    assert!(
        pttl > 0 && pttl <= 600_000,
        "staging safety expiry: PTTL {pttl}"
    );
    assert_eq!(
        as_int(&ok(&mut c, &["EXISTS", "M"])),
        0,
        "no half key under the real name"
    );
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"M", b"list", b"2", b"2", b"c", b"d"])]
        ),
        vec![1]
    );
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"M", b"list", b"2", b"2", b"c", b"d"])]
        ),
        vec![0],
        "duplicate of an applied chunk"
    );
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"COMMIT", b"M", b"list", b"4", b"0", b"-", b"0"])]
        ),
        vec![1]
    );
    assert_eq!(lr(&mut c, "M"), ["a", "b", "c", "d"]);

    // String chunks: offset in bytes.
    let at = now_ms() + 1_000_000 + 3;
    let r = restore_ok(
        &mut c,
        sid,
        &[
            rec(&[b"CHUNK", b"S", b"string", b"0", b"1", b"hello \0"]),
            rec(&[b"CHUNK", b"S", b"string", b"7", b"1", b"world"]),
            rec(&[b"CHUNK", b"S", b"string", b"7", b"1", b"world"]),
            rec(&[
                b"COMMIT",
                b"S",
                b"string",
                b"12",
                at.to_string().as_bytes(),
                b"-",
                b"0",
            ]),
        ],
    );
    assert_eq!(r, vec![1, 1, 0, 1]);
    assert_eq!(
        as_bytes(&ok(&mut c, &["GET", "S"])),
        b"hello \0world".to_vec()
    );
    assert_eq!(
        as_int(&ok(&mut c, &["PEXPIRETIME", "S"])),
        at,
        "COMMIT sets the absolute expiry"
    );

    // Hash, set, zset: set-like chunks (a resent chunk is harmless).
    let r = restore_ok(
        &mut c,
        sid,
        &[
            rec(&[
                b"CHUNK", b"Hh", b"hash", b"0", b"2", b"f1", b"v1", b"f2", b"v2",
            ]),
            rec(&[b"CHUNK", b"Hh", b"hash", b"2", b"1", b"f3", b"v3"]),
            rec(&[b"CHUNK", b"Hh", b"hash", b"2", b"1", b"f3", b"v3"]),
            rec(&[b"COMMIT", b"Hh", b"hash", b"3", b"0", b"-", b"0"]),
            rec(&[b"CHUNK", b"Ss", b"set", b"0", b"3", b"1", b"2", b"x"]),
            rec(&[b"COMMIT", b"Ss", b"set", b"3", b"0", b"-", b"0"]),
            rec(&[
                b"CHUNK",
                b"Zz",
                b"zset",
                b"0",
                b"2",
                b"1.5",
                b"a",
                b"-0.10000000000000001",
                b"b",
            ]),
            rec(&[b"CHUNK", b"Zz", b"zset", b"2", b"1", b"1e+300", b"c"]),
            rec(&[b"COMMIT", b"Zz", b"zset", b"3", b"0", b"-", b"0"]),
        ],
    );
    assert_eq!(r[0..2], [1, 1]);
    assert!(r[2] == 0 || r[2] == 1, "{r:?}");
    assert_eq!(r[3..], [1, 1, 1, 1, 1, 1]);
    assert_eq!(as_array(&ok(&mut c, &["HGETALL", "Hh"])).len(), 6);
    assert_eq!(as_int(&ok(&mut c, &["SCARD", "Ss"])), 3);
    // Scores compared as numbers: Redis 7.0 prints 17 digits, Valkey the
    // shortest form that round-trips.
    let z: Vec<String> = as_array(&ok(&mut c, &["ZRANGE", "Zz", "0", "-1", "WITHSCORES"]))
        .iter()
        .map(as_string)
        .collect();
    let members: Vec<&str> = z.iter().step_by(2).map(|s| s.as_str()).collect();
    let scores: Vec<f64> = z
        .iter()
        .skip(1)
        .step_by(2)
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(members, ["b", "a", "c"]);
    assert_eq!(scores, [-0.1, 1.5, 1e300]);
    assert!(staging_keys(&mut c).is_empty());
    check(&mut c);
}

#[test]
fn restart_replies_and_commit_checks() {
    let f = fixture();
    let mut c = f.t.conn();
    let sid = "job-9";
    // A chunk past the staging key's end (a chunk was lost): -1.
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"G", b"list", b"0", b"2", b"a", b"b"])]
        ),
        vec![1]
    );
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"G", b"list", b"5", b"1", b"x"])]
        ),
        vec![-1]
    );
    // A chunk with offset > 0 and no staging key: -1.
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"N", b"list", b"3", b"1", b"x"])]
        ),
        vec![-1]
    );
    // COMMIT without a staging key: -1, and an existing key of that name is untouched.
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[
                b"COMMIT", b"prelist", b"list", b"2", b"0", b"-", b"0"
            ])]
        ),
        vec![-1]
    );
    assert_eq!(as_int(&ok(&mut c, &["LLEN", "prelist"])), 2);
    // COMMIT with the wrong length or type: -1, the key is not created.
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"W", b"list", b"0", b"2", b"a", b"b"])]
        ),
        vec![1]
    );
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"COMMIT", b"W", b"list", b"3", b"0", b"-", b"0"])]
        ),
        vec![-1]
    );
    assert_eq!(as_int(&ok(&mut c, &["EXISTS", "W"])), 0);
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"W", b"list", b"0", b"2", b"a", b"b"])]
        ),
        vec![1]
    );
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"COMMIT", b"W", b"set", b"2", b"0", b"-", b"0"])]
        ),
        vec![-1]
    );
    assert_eq!(as_int(&ok(&mut c, &["EXISTS", "W"])), 0);
    // Offset 0 starts afresh: the transfer restarts cleanly.
    let r = restore_ok(
        &mut c,
        sid,
        &[
            rec(&[b"CHUNK", b"G", b"list", b"0", b"2", b"p", b"q"]),
            rec(&[b"CHUNK", b"G", b"list", b"2", b"1", b"r"]),
            rec(&[b"COMMIT", b"G", b"list", b"3", b"0", b"-", b"0"]),
        ],
    );
    assert_eq!(r, vec![1, 1, 1]);
    let g: Vec<String> = as_array(&ok(&mut c, &["LRANGE", "G", "0", "-1"]))
        .iter()
        .map(as_string)
        .collect();
    assert_eq!(g, ["p", "q", "r"]);
    // COMMIT of an expired key: nothing to do, no key, no staging key left.
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"E", b"list", b"0", b"1", b"a"])]
        ),
        vec![1]
    );
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"COMMIT", b"E", b"list", b"1", b"1000", b"-", b"0"])]
        ),
        vec![0]
    );
    assert_eq!(
        as_int(&ok(&mut c, &["EXISTS", "E"])),
        0,
        "expired COMMIT resurrected a key"
    );
    // ABORT drops the staging key.
    assert_eq!(
        restore_ok(
            &mut c,
            sid,
            &[rec(&[b"CHUNK", b"Q", b"hash", b"0", b"1", b"f", b"v"])]
        ),
        vec![1]
    );
    let r = restore_ok(&mut c, sid, &[rec(&[b"ABORT", b"Q"])]);
    assert!(r == vec![1] || r == vec![0], "{r:?}");
    assert_eq!(as_int(&ok(&mut c, &["EXISTS", "Q"])), 0);
    let left: Vec<String> = staging_keys(&mut c).iter().map(|k| show(k)).collect();
    assert!(
        !left.iter().any(|k| k.ends_with(":Q") || k.ends_with(":G")),
        "staging keys left: {left:?}"
    );
    // Replies in record order, mixed.
    let r = restore_ok(
        &mut c,
        sid,
        &[
            rec(&[b"DUMP", b"d1", b"0", b"-", b"0", &f.ps]),
            rec(&[b"CHUNK", b"c1", b"list", b"0", b"1", b"x"]),
            rec(&[b"CHUNK", b"c2", b"list", b"7", b"1", b"y"]),
            rec(&[b"DUMP", b"d2", b"1", b"-", b"0", &f.ps]),
        ],
    );
    assert_eq!(r, vec![1, 1, -1, 0]);
    check(&mut c);
}

#[test]
fn staging_keys_are_per_source_id() {
    let f = fixture();
    let mut c = f.t.conn();
    assert_eq!(
        restore_ok(
            &mut c,
            "one",
            &[rec(&[b"CHUNK", b"K", b"list", b"0", b"2", b"a", b"b"])]
        ),
        vec![1]
    );
    assert_eq!(
        restore_ok(
            &mut c,
            "two",
            &[rec(&[b"CHUNK", b"K", b"list", b"0", b"2", b"x", b"y"])]
        ),
        vec![1]
    );
    assert_eq!(staging_keys(&mut c).len(), 2);
    assert_eq!(
        restore_ok(
            &mut c,
            "one",
            &[rec(&[b"COMMIT", b"K", b"list", b"2", b"0", b"-", b"0"])]
        ),
        vec![1]
    );
    let k: Vec<String> = as_array(&ok(&mut c, &["LRANGE", "K", "0", "-1"]))
        .iter()
        .map(as_string)
        .collect();
    assert_eq!(k, ["a", "b"]);
    assert_eq!(
        restore_ok(
            &mut c,
            "two",
            &[rec(&[b"COMMIT", b"K", b"list", b"2", b"0", b"-", b"0"])]
        ),
        vec![1]
    );
    let k: Vec<String> = as_array(&ok(&mut c, &["LRANGE", "K", "0", "-1"]))
        .iter()
        .map(as_string)
        .collect();
    assert_eq!(k, ["x", "y"]);
    // COMMIT replaces a key of another type.
    assert_eq!(
        restore_ok(
            &mut c,
            "one",
            &[rec(&[b"CHUNK", b"prehash", b"set", b"0", b"1", b"m"])]
        ),
        vec![1]
    );
    assert_eq!(
        restore_ok(
            &mut c,
            "one",
            &[rec(&[
                b"COMMIT", b"prehash", b"set", b"1", b"0", b"-", b"0"
            ])]
        ),
        vec![1]
    );
    assert_eq!(as_string(&ok(&mut c, &["TYPE", "prehash"])), "set");
    check(&mut c);
}

/// A stream built from records. MIGRATION.md writes a stream entry as
/// `id nfields field value ...` without saying whether nfields counts pairs
/// or elements; pairs is tried first, elements second, and exactly one must
/// be accepted.
#[test]
fn chunked_stream_with_group_consumer_pending_meta() {
    let f = fixture();
    let mut c = f.t.conn();
    let sid = "job-s";
    let now = now_ms();
    let tail: Vec<Vec<Vec<u8>>> = vec![
        rec(&[b"GROUP", b"X", b"g", b"1-1", b"1"]),
        rec(&[b"GROUP", b"X", b"h", b"0-0", b"-1"]),
        rec(&[b"CONSUMER", b"X", b"g", b"alice"]),
        rec(&[b"CONSUMER", b"X", b"g", b"bob"]),
        rec(&[
            b"PENDING", b"X", b"g", b"2", b"1-1", b"alice", b"1000", b"3", b"0-5", b"bob", b"0",
            b"1",
        ]),
        // 0-5 was deleted but is pending: the source sends a placeholder
        // entry for it (first in the chunk) and deletes it once claimed.
        rec(&[b"XDEL", b"X", b"1", b"0-5"]),
        rec(&[b"STREAMMETA", b"X", b"5-0", b"10", b"0-5"]),
        rec(&[b"COMMIT", b"X", b"stream", b"2", b"0", b"-", b"0"]),
    ];
    let pairs = rec(&[
        b"CHUNK",
        b"X",
        b"stream",
        b"0",
        b"3",
        b"0-5",
        b"1",
        b"slotfork-deleted-entry",
        b"",
        b"1-1",
        b"1",
        b"f",
        b"v",
        b"2-0",
        b"2",
        b"a",
        b"1",
        b"b",
        b"2",
    ]);
    let elems = rec(&[
        b"CHUNK",
        b"X",
        b"stream",
        b"0",
        b"3",
        b"0-5",
        b"2",
        b"slotfork-deleted-entry",
        b"",
        b"1-1",
        b"2",
        b"f",
        b"v",
        b"2-0",
        b"4",
        b"a",
        b"1",
        b"b",
        b"2",
    ]);
    let mut batch = vec![pairs.clone()];
    batch.extend(tail.iter().cloned());
    let r = match run(&mut c, &restore_args("1", sid, &batch)) {
        Ok(v) => {
            eprintln!("stream entries: nfields counts field/value pairs");
            ints(&v)
        }
        Err(e1) => {
            let mut batch = vec![elems.clone()];
            batch.extend(tail.iter().cloned());
            match run(&mut c, &restore_args("1", sid, &batch)) {
                Ok(v) => {
                    eprintln!(
                        "stream entries: nfields counts elements ({})",
                        err_text(&e1)
                    );
                    ints(&v)
                }
                Err(e2) => panic!(
                    "stream CHUNK rejected with nfields as pairs ({}) and as elements ({})",
                    err_text(&e1),
                    err_text(&e2)
                ),
            }
        }
    };
    assert_eq!(r, vec![1; 9]);
    let s = snap_key(&mut c, b"X").expect("stream committed");
    let Content::Stream(s) = s.content else {
        panic!("type")
    };
    assert_eq!(
        s.entries,
        vec![
            ("1-1".to_string(), vec![b"f".to_vec(), b"v".to_vec()]),
            (
                "2-0".to_string(),
                vec![b"a".to_vec(), b"1".to_vec(), b"b".to_vec(), b"2".to_vec()]
            ),
        ]
    );
    assert_eq!(s.last_id, "5-0");
    assert_eq!(s.entries_added, 10);
    assert_eq!(s.max_deleted_id, "0-5");
    assert_eq!(s.groups.len(), 2);
    let g = &s.groups[0];
    assert_eq!(
        (
            g.name.as_str(),
            g.last_delivered.as_str(),
            g.entries_read.as_str()
        ),
        ("g", "1-1", "1")
    );
    assert_eq!(g.pel_count, 2);
    assert_eq!(g.pending[0].id, "0-5");
    assert_eq!(g.pending[0].consumer, "bob");
    assert_eq!(g.pending[1].id, "1-1");
    assert_eq!(g.pending[1].consumer, "alice");
    assert_eq!(g.pending[1].deliveries, 3);
    let dt = g.pending[1].delivery_time;
    assert!(
        (now - 1000 - 5000..=now - 1000 + 5000).contains(&dt),
        "delivery time {dt} = now - idle-ms"
    );
    assert_eq!(
        g.consumers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    let h = &s.groups[1];
    assert_eq!(
        (h.name.as_str(), h.entries_read.as_str()),
        ("h", ""),
        "entries-read -1 = unknown (nil)"
    );
    check(&mut c);
}

#[test]
fn batch_is_replicated_as_one_transaction() {
    let f = fixture();
    let r = Server::builder().replica_of(&f.t).start();
    wait_replica_sync(&f.t, &r);
    let mut c = f.t.conn();
    let batch = vec![
        rec(&[b"DUMP", b"rd", b"0", b"-", b"0", &f.ph]),
        rec(&[b"CHUNK", b"rl", b"list", b"0", b"2", b"a", b"b"]),
        rec(&[
            b"COMMIT",
            b"rl",
            b"list",
            b"2",
            (now_ms() + 100_000).to_string().as_bytes(),
            b"-",
            b"0",
        ]),
        rec(&[b"CHUNK", b"rs", b"set", b"0", b"2", b"a", b"b"]),
        rec(&[b"DUMP", b"k", b"1", b"-", b"0", &f.ps]),
    ];
    assert_eq!(restore_ok(&mut c, "rep", &batch), vec![1, 1, 1, 1, 0]);
    wait_replica_sync(&f.t, &r);
    let mut rc = r.conn();
    assert_eq!(digest(&mut c), digest(&mut rc));
    assert_same_data(
        &snap_db(&mut c),
        &snap_db(&mut rc),
        "replica after SLOTS.RESTORE",
    );
    assert_eq!(staging_keys(&mut rc).len(), 1);
    assert_eq!(as_int(&ok(&mut rc, &["EXISTS", "k"])), 0);
    check(&mut rc);
}

/// Parse the RESP commands of an AOF file.
fn aof_commands(data: &[u8]) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut i = 0;
    let line = |i: &mut usize| -> Vec<u8> {
        let start = *i;
        while &data[*i..*i + 2] != b"\r\n" {
            *i += 1;
        }
        let l = data[start..*i].to_vec();
        *i += 2;
        l
    };
    while i < data.len() {
        let l = line(&mut i);
        assert_eq!(l[0], b'*', "AOF: expected an array at {i}");
        let n: usize = std::str::from_utf8(&l[1..]).unwrap().parse().unwrap();
        let mut cmd = Vec::new();
        for _ in 0..n {
            let l = line(&mut i);
            assert_eq!(l[0], b'$');
            let len: usize = std::str::from_utf8(&l[1..]).unwrap().parse().unwrap();
            cmd.push(data[i..i + len].to_vec());
            i += len + 2;
        }
        out.push(cmd);
    }
    out
}

#[test]
fn batch_is_one_transaction_in_the_aof() {
    let helper = Server::builder().without_module().start();
    let mut hc = helper.conn();
    ok(&mut hc, &["SET", "s", "hello"]);
    let ps = dump(&mut hc, "s");
    let t = Server::builder().appendonly(true).start();
    let mut c = t.conn();
    let batch = vec![
        rec(&[b"DUMP", b"aof1", b"0", b"-", b"0", &ps]),
        rec(&[b"DUMP", b"aof2", b"0", b"-", b"0", &ps]),
        rec(&[b"CHUNK", b"aof3", b"list", b"0", b"2", b"a", b"b"]),
        rec(&[b"COMMIT", b"aof3", b"list", b"2", b"0", b"-", b"0"]),
    ];
    assert_eq!(restore_ok(&mut c, "aofjob", &batch), vec![1, 1, 1, 1]);
    ok(&mut c, &["SET", "after", "1"]);
    // appendfsync everysec: wait until the write is in the file.
    let dir = t.dir().join("appendonlydir");
    let mut cmds = Vec::new();
    wait_until(
        std::time::Duration::from_secs(10),
        "the AOF to hold the batch",
        || {
            let Some(f) = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(".incr.aof"))
            else {
                return false;
            };
            cmds = aof_commands(&std::fs::read(f).unwrap());
            cmds.iter().any(|c| c.iter().any(|a| a == b"after"))
        },
    );
    let names: Vec<String> = cmds
        .iter()
        .map(|c| String::from_utf8_lossy(&c[0]).to_uppercase())
        .collect();
    let touches = |c: &Vec<Vec<u8>>, k: &[u8]| c.iter().skip(1).any(|a| a == k);
    let pos: Vec<usize> = [b"aof1".as_slice(), b"aof2", b"aof3"]
        .iter()
        .map(|k| {
            cmds.iter()
                .position(|c| touches(c, k))
                .unwrap_or_else(|| panic!("{} not in the AOF: {names:?}", show(k)))
        })
        .collect();
    let first = *pos.iter().min().unwrap();
    let last = cmds
        .iter()
        .rposition(|c| touches(c, b"aof3") || touches(c, b"aof1") || touches(c, b"aof2"))
        .unwrap();
    let multi = names[..first].iter().rposition(|n| n == "MULTI");
    let exec = names[last..]
        .iter()
        .position(|n| n == "EXEC")
        .map(|p| p + last);
    assert!(
        multi.is_some() && exec.is_some(),
        "the batch's writes are not wrapped in MULTI/EXEC in the AOF: {names:?}"
    );
    let (m, e) = (multi.unwrap(), exec.unwrap());
    assert!(
        !names[m + 1..e].iter().any(|n| n == "MULTI" || n == "EXEC"),
        "the batch is split over several transactions: {names:?}"
    );
}

/// Stream chunks are checked by offset (entries sent before the chunk), like
/// lists: a resent chunk is a duplicate (0), a gap is a restart (-1).
#[test]
fn stream_chunk_offsets() {
    let f = fixture();
    let mut c = f.t.conn();
    let sid = "job-so";
    let ch = |off: &[u8], id: &[u8], v: &[u8]| {
        rec(&[b"CHUNK", b"Y", b"stream", off, b"1", id, b"1", b"f", v])
    };
    assert_eq!(restore_ok(&mut c, sid, &[ch(b"0", b"1-1", b"a")]), vec![1]);
    assert_eq!(restore_ok(&mut c, sid, &[ch(b"1", b"2-0", b"b")]), vec![1]);
    assert_eq!(
        restore_ok(&mut c, sid, &[ch(b"1", b"2-0", b"b")]),
        vec![0],
        "resent stream chunk"
    );
    assert_eq!(
        restore_ok(&mut c, sid, &[ch(b"5", b"9-0", b"z")]),
        vec![-1],
        "stream chunk past the staging key's end"
    );
    // After a restart the source sends from offset 0 again.
    let r = restore_ok(
        &mut c,
        sid,
        &[
            ch(b"0", b"1-1", b"a"),
            ch(b"1", b"2-0", b"b"),
            rec(&[b"STREAMMETA", b"Y", b"2-0", b"2", b"0-0"]),
            rec(&[b"COMMIT", b"Y", b"stream", b"2", b"0", b"-", b"0"]),
        ],
    );
    assert_eq!(r, vec![1, 1, 1, 1]);
    let xr = ok(&mut c, &["XRANGE", "Y", "-", "+"]);
    let ids: Vec<String> = as_array(&xr)
        .iter()
        .map(|e| as_string(&as_array(e)[0]))
        .collect();
    assert_eq!(ids, ["1-1", "2-0"]);
    assert!(staging_keys(&mut c).is_empty());
}

/// Records that fail at run time, after validation: a stream chunk whose
/// second entry the server refuses leaves a staging key that still expires;
/// CONSUMER and PENDING on a staging name that holds something else than a
/// stream answer "restart" (the source resends the key) rather than an
/// error (which fails the whole job).
#[test]
fn runtime_failures_of_stream_records() {
    let f = fixture();
    let mut c = f.t.conn();
    let stage = "slotfork:staging:src-9:k";
    // The reply is [error]; the client library surfaces it as an error.
    let r = raw(
        &mut c,
        &restore_args(
            "1",
            "src-9",
            &[rec(&[
                b"CHUNK", b"k", b"stream", b"0", b"2", b"1-1", b"1", b"f", b"v", b"1-1", b"1",
                b"f", b"v",
            ])],
        ),
    );
    let e = err_text(&r.expect_err("the second XADD fails"));
    assert!(e.contains("XADD"), "{e}");
    let ttl = as_int(&ok(&mut c, &["PTTL", stage]));
    assert!(
        ttl > 0,
        "a half-applied staging key without expiry: PTTL {ttl}"
    );

    ok(&mut c, &["DEL", stage]);
    ok(&mut c, &["SET", stage, "not a stream"]);
    let got = restore_ok(
        &mut c,
        "src-9",
        &[
            rec(&[b"CONSUMER", b"k", b"g", b"alice"]),
            rec(&[b"PENDING", b"k", b"g", b"1", b"1-1", b"alice", b"5", b"1"]),
        ],
    );
    assert_eq!(got, vec![-1, -1]);
}
