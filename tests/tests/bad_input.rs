//! Bad input to every command: an error reply, never a crash.

use std::collections::BTreeSet;

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn ping(c: &mut redis::Connection, after: &str) {
    match redis::cmd("PING").query::<String>(c) {
        Ok(p) if p == "PONG" => {}
        other => panic!("PING after {after} -> {other:?} (server crashed?)"),
    }
}

/// `args` must fail with an error containing `want` (case-insensitive; "" = any error).
fn bad<A: AsRef<[u8]>>(c: &mut redis::Connection, args: &[A], want: &str) {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_ref()).collect();
    let shown: Vec<String> = args
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let e = match run(c, &args) {
        Ok(v) => panic!("{shown:?} should fail, got {v:?}"),
        Err(e) => {
            assert!(
                !e.is_io_error(),
                "{shown:?}: connection error (server crash?): {e}"
            );
            err_text(&e)
        }
    };
    assert!(
        e.to_lowercase().contains(&want.to_lowercase()),
        "{shown:?}: error {e:?} should contain {want:?}"
    );
    ping(c, &format!("{shown:?}"));
}

fn b<'a>(args: &[&'a str]) -> Vec<&'a [u8]> {
    args.iter().map(|a| a.as_bytes()).collect()
}

const ARITY: &str = "wrong number of arguments";

/// Malformed slot arguments: non-integers, negatives, out of range, overflow.
fn bad_slots(h: HashFn) -> Vec<String> {
    let mut v: Vec<String> = [
        "abc",
        "",
        " ",
        "1.5",
        "1e3",
        "0x10",
        " 1",
        "1 ",
        "-1",
        "-0x1",
        "65536",
        "2147483648",
        "4294967296",
        "-9223372036854775808",
        "9223372036854775807",
        "9223372036854775808",
        "99999999999999999999999",
        "\u{0}",
        "1\u{0}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(h.slot_count().to_string());
    v.push((h.slot_count() + 1).to_string());
    v
}

/// The three server variants every bad-input test runs against.
fn variants() -> Vec<(&'static str, Server, HashFn)> {
    vec![
        ("crc32 full", Server::start(), HashFn::Crc32),
        (
            "crc32 counts-only",
            Server::builder().counts_only().start(),
            HashFn::Crc32,
        ),
        (
            "crc16 full",
            Server::builder().crc16().start(),
            HashFn::Crc16,
        ),
    ]
}

#[test]
fn arity_errors() {
    for (name, mut s, _) in variants() {
        let mut c = s.conn();
        for args in [
            b(&["SLOTS.HASHKEY"]),
            b(&["SLOTS.INFO", "0", "1", "2"]),
            b(&["SLOTS.COUNT"]),
            b(&["SLOTS.COUNT", "1", "2"]),
            b(&["SLOTS.KEYS"]),
            b(&["SLOTS.KEYS", "1"]),
            b(&["SLOTS.KEYS", "1", "2", "3"]),
            b(&["SLOTS.SCAN"]),
            b(&["SLOTS.SCAN", "1"]),
            b(&["SLOTS.DEL"]),
            b(&["SLOTS.CHECK", "extra"]),
        ] {
            // SLOTS.INFO with 3 args and SLOTS.KEYS with 3 may be reported as
            // a syntax error instead of arity; both are errors.
            let want = if args.len() > 3 || (args[0] == b"SLOTS.INFO") {
                ""
            } else {
                ARITY
            };
            bad(&mut c, &args, want);
        }
        s.assert_alive(&format!("{name}: arity errors"));
    }
}

#[test]
fn bad_slot_numbers_every_command() {
    for (name, mut s, h) in variants() {
        let mut c = s.conn();
        set_many(&mut c, &tagged_keys("x", 10));
        for slot in bad_slots(h) {
            let slot = slot.as_str();
            bad(&mut c, &b(&["SLOTS.COUNT", slot]), "");
            bad(&mut c, &b(&["SLOTS.KEYS", slot, "10"]), "");
            bad(&mut c, &b(&["SLOTS.SCAN", slot, "0"]), "");
            bad(&mut c, &b(&["SLOTS.SCAN", slot, "0", "COUNT", "10"]), "");
            bad(&mut c, &b(&["SLOTS.DEL", slot]), "");
            // One bad slot among good ones.
            bad(&mut c, &b(&["SLOTS.DEL", "1", slot]), "");
        }
        // Errors start with ERR (not a made-up prefix), for a non-integer and out of range.
        let top = h.slot_count().to_string();
        for args in [
            b(&["SLOTS.COUNT", "abc"]),
            b(&["SLOTS.COUNT", &top]),
            b(&["SLOTS.COUNT", "-1"]),
        ] {
            let e = expect_err(&mut c, &args);
            assert!(e.starts_with("ERR"), "{name}: {args:?} -> {e:?}");
        }
        // Nothing was deleted by the rejected SLOTS.DEL calls.
        assert_eq!(slots_info_num(&mut c, "slots_del_pending_slots"), 0);
        assert_eq!(dbsize(&mut c), 10, "{name}");
        assert_exact(&mut c, h);
        s.assert_alive(&format!("{name}: bad slot numbers"));
    }
}

#[test]
fn slots_del_rejects_whole_call_on_one_bad_slot() {
    for (name, s, h) in variants() {
        let mut c = s.conn();
        set_many(&mut c, &tagged_keys("keepme", 10));
        let ks = h.slot(b"keepme").to_string();
        let top = h.slot_count().to_string();
        bad(&mut c, &["SLOTS.DEL", &ks, &top], "");
        bad(&mut c, &["SLOTS.DEL", &ks, "abc"], "");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            dbsize(&mut c),
            10,
            "{name}: a rejected SLOTS.DEL must not delete any slot"
        );
        assert_exact(&mut c, h);
    }
}

#[test]
fn bad_counts_and_cursors() {
    let mut wording = Vec::new();
    for (name, mut s, h) in variants() {
        let mut c = s.conn();
        set_many(&mut c, &tagged_keys("x", 10));
        let xs_owned = h.slot(b"x").to_string();
        let xs: &str = &xs_owned;
        for count in [
            "abc",
            "",
            "-1",
            "1.5",
            "-9223372036854775808",
            "99999999999999999999999",
            "\u{0}",
        ] {
            bad(&mut c, &b(&["SLOTS.KEYS", xs, count]), "");
        }
        for cursor in ["abc", "", "1.5", "-1", "99999999999999999999999", "\u{0}"] {
            bad(&mut c, &b(&["SLOTS.SCAN", xs, cursor]), "");
        }
        for count in ["abc", "", "-1", "0", "1.5", "99999999999999999999999"] {
            bad(&mut c, &b(&["SLOTS.SCAN", xs, "0", "COUNT", count]), "");
        }
        // Unknown options and a missing COUNT value: syntax error.
        for args in [
            b(&["SLOTS.SCAN", xs, "0", "MATCH", "*"]),
            b(&["SLOTS.SCAN", xs, "0", "FOO"]),
            b(&["SLOTS.SCAN", xs, "0", "COUNT"]),
            b(&["SLOTS.SCAN", xs, "0", "COUNT", "10", "EXTRA"]),
            b(&["SLOTS.SCAN", xs, "0", ""]),
        ] {
            // Any error passes `bad`; the wording is collected and checked
            // at the end so the rest of this test still runs.
            bad(&mut c, &args, "");
            let e = expect_err(&mut c, &args);
            if !e.to_lowercase().contains("syntax") {
                let shown: Vec<_> = args.iter().map(|a| String::from_utf8_lossy(a)).collect();
                wording.push(format!(
                    "{name}: {shown:?} -> {e:?} (expected a syntax error)"
                ));
            }
        }
        // SLOTS.INFO start / count.
        for start in ["abc", "", "-1", "1.5", "99999999999999999999999"] {
            bad(&mut c, &b(&["SLOTS.INFO", start]), "");
            bad(&mut c, &b(&["SLOTS.INFO", start, "10"]), "");
        }
        for count in ["abc", "", "1.5", "99999999999999999999999"] {
            bad(&mut c, &b(&["SLOTS.INFO", "0", count]), "");
        }
        s.assert_alive(&format!("{name}: bad counts and cursors"));
    }
    assert!(wording.is_empty(), "{}", wording.join("\n"));
}

#[test]
fn huge_but_valid_numbers() {
    for (name, mut s, h) in variants() {
        let mut c = s.conn();
        set_many(&mut c, &tagged_keys("x", 10));
        set_many(
            &mut c,
            &(0..200).map(|i| format!("k{i}")).collect::<Vec<_>>(),
        );
        let xs = h.slot(b"x").to_string();
        let xslot: u32 = xs.parse().unwrap();
        let max = i64::MAX.to_string();
        // Huge counts are limits, not allocation sizes.
        let v = ok(&mut c, &["SLOTS.KEYS", &xs, &max]);
        assert_eq!(
            as_array(&v).len() as u64,
            slots_count(&mut c, xslot),
            "{name}: SLOTS.KEYS i64::MAX"
        );
        let v = ok(&mut c, &["SLOTS.SCAN", &xs, "0", "COUNT", &max]);
        let a = as_array(&v);
        if name.contains("full") {
            assert_eq!(
                as_string(&a[0]),
                "0",
                "{name}: COUNT i64::MAX finishes in one call"
            );
            assert_eq!(as_array(&a[1]).len() as u64, slots_count(&mut c, xslot));
        }
        let mut args = vec![
            "SLOTS.SCAN".to_string(),
            xs.clone(),
            "0".into(),
            "COUNT".into(),
            max.clone(),
        ];
        let mut got = BTreeSet::new();
        for _ in 0..100_000 {
            let v = ok(&mut c, &args);
            let a = as_array(&v);
            got.extend(as_array(&a[1]).iter().map(as_bytes));
            if as_string(&a[0]) == "0" {
                break;
            }
            args[2] = as_string(&a[0]);
        }
        assert_eq!(
            got.len() as u64,
            slots_count(&mut c, xslot),
            "{name}: SCAN COUNT i64::MAX"
        );
        // SLOTS.INFO start + count overflowing i64.
        let all = slots_info(&mut c);
        let v = ok(&mut c, &["SLOTS.INFO", "5", &max]);
        let got: Vec<u32> = parse_slots_info(&v).iter().map(|e| e.slot).collect();
        let want: Vec<u32> = all.keys().copied().filter(|&s| s >= 5).collect();
        assert_eq!(got, want, "{name}: SLOTS.INFO 5 i64::MAX");
        let top = h.slot_count() - 1;
        let v = ok(&mut c, &["SLOTS.INFO", &top.to_string(), &max]);
        let got: Vec<u32> = parse_slots_info(&v).iter().map(|e| e.slot).collect();
        assert_eq!(
            got,
            all.keys()
                .copied()
                .filter(|&s| s == top)
                .collect::<Vec<_>>()
        );
        // A very large start is either an error or an empty answer; never a crash.
        for start in [
            h.slot_count().to_string(),
            "100000".to_string(),
            max.clone(),
        ] {
            match run(&mut c, &["SLOTS.INFO", &start]) {
                Ok(v) => assert!(
                    as_array(&v).is_empty(),
                    "{name}: SLOTS.INFO {start} -> {v:?}"
                ),
                Err(e) => assert!(!e.is_io_error()),
            }
        }
        // Negative SLOTS.INFO count: error or empty.
        match run(&mut c, &["SLOTS.INFO", "0", "-1"]) {
            Ok(v) => assert!(as_array(&v).is_empty(), "{name}: SLOTS.INFO 0 -1 -> {v:?}"),
            Err(e) => assert!(!e.is_io_error()),
        }
        s.assert_alive(&format!("{name}: huge numbers"));
    }
}

#[test]
fn binary_keys_with_nul_bytes() {
    for (name, s, h) in variants() {
        let mut c = s.conn();
        let keys: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\0".to_vec(),
            b"\0\0\0".to_vec(),
            b"a\0b".to_vec(),
            b"{\0}x".to_vec(),
            b"y{\0}".to_vec(),
            b"{a\0b}1".to_vec(),
            b"{a\0b}2".to_vec(),
            b"\xff\xfe\xfd".to_vec(),
            b"{}".to_vec(),
            b"{}\0".to_vec(),
            vec![0u8; 1000],
            (0..=255u8).collect(),
        ];
        for k in &keys {
            ok(&mut c, &[b"SET".as_slice(), k, b"v"]);
        }
        assert_exact(&mut c, h);
        // Every key is found in its slot, byte for byte.
        let slots: BTreeSet<u32> = keys.iter().map(|k| h.slot(k)).collect();
        for &slot in &slots {
            let want: BTreeSet<Vec<u8>> =
                keys.iter().filter(|k| h.slot(k) == slot).cloned().collect();
            let got: BTreeSet<Vec<u8>> = slots_keys(&mut c, slot, 100).into_iter().collect();
            assert_eq!(got, want, "{name}: SLOTS.KEYS {slot}");
            let got: BTreeSet<Vec<u8>> = slots_scan_all(&mut c, slot, None).into_iter().collect();
            assert_eq!(got, want, "{name}: SLOTS.SCAN {slot}");
            assert_eq!(slots_count(&mut c, slot), want.len() as u64);
        }
        assert_eq!(hashkey(&mut c, b"{a\0b}1"), hashkey(&mut c, b"a\0b"));
        assert_eq!(hashkey(&mut c, b""), 0);
        for k in &keys {
            assert_eq!(hashkey(&mut c, k), h.slot(k), "{name}: SLOTS.HASHKEY {k:?}");
        }
        // RENAME between binary keys, DEL them all.
        ok(&mut c, &[b"RENAME".as_slice(), b"a\0b", b"a\0c"]);
        assert_exact(&mut c, h);
        for k in keys.iter().filter(|k| k.as_slice() != b"a\0b") {
            ok(&mut c, &[b"DEL".as_slice(), k]);
        }
        ok(&mut c, &[b"DEL".as_slice(), b"a\0c"]);
        assert_eq!(dbsize(&mut c), 0);
        assert_eq!(slots_info(&mut c).len(), 0);
        check(&mut c);
    }
}

#[test]
fn bad_module_args_refuse_to_load() {
    let mut failures = Vec::new();
    for args in [
        vec!["hash-function", "md5"],
        vec!["hash-function"],
        vec!["index-mode", "partial"],
        vec!["index-mode"],
        vec!["step-budget-us", "abc"],
        vec!["step-budget-us", "99999999999999999999999"],
        vec!["no-such-option", "1"],
        vec!["hash-function", "crc16", "index-mode"],
    ] {
        let mut bld = Server::builder();
        for a in &args {
            bld = bld.raw_module_arg(a);
        }
        match bld.try_start() {
            Ok(mut s) => {
                let alive = s.is_alive();
                let mut c = s.conn();
                let cfg: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("slots.*")
                    .query(&mut c)
                    .unwrap_or_default();
                failures.push(format!(
                    "module args {args:?} accepted (server alive: {alive}, CONFIG GET slots.* = {cfg:?})"
                ));
            }
            Err(e) => {
                if e.contains("did not answer PING") {
                    failures.push(format!(
                        "module args {args:?}: server hung instead of refusing: {e}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "bad module args should make loading fail:\n{}",
        failures.join("\n")
    );
}

/// CONFIG SET slots.step-budget-us only takes 50..=100000; the same value
/// given as a module argument must be refused or brought into that range, so
/// a server cannot start with a budget CONFIG SET would reject.
#[test]
fn step_budget_module_arg_bounds() {
    let mut failures = Vec::new();
    for v in ["-1", "0", "10", "49", "100001", "999999999"] {
        match Server::builder()
            .raw_module_arg("step-budget-us")
            .raw_module_arg(v)
            .try_start()
        {
            Ok(s) => {
                let mut c = s.conn();
                let got: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("slots.step-budget-us")
                    .query(&mut c)
                    .unwrap();
                let n: i64 = got[1].parse().unwrap();
                if !(50..=100_000).contains(&n) {
                    failures.push(format!(
                        "step-budget-us {v} accepted at load, CONFIG GET -> {n}"
                    ));
                }
                // Whatever the value, SLOTS.DEL must still work.
                set_many(&mut c, &tagged_keys("sb", 500));
                ok(
                    &mut c,
                    &["SLOTS.DEL".to_string(), H.slot(b"sb").to_string()],
                );
                wait_del_done(&mut c);
                assert_eq!(dbsize(&mut c), 0, "step-budget-us {v}");
            }
            Err(e) => assert!(!e.contains("did not answer PING"), "{v}: {e}"),
        }
    }
    for v in ["50", "100000"] {
        let s = Server::builder().module_arg("step-budget-us", v).start();
        let got: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("slots.step-budget-us")
            .query(&mut s.conn())
            .unwrap();
        assert_eq!(got[1], v);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn valid_module_args_in_any_order() {
    let s = Server::builder()
        .module_arg("step-budget-us", "123")
        .module_arg("index-mode", "counts-only")
        .module_arg("hash-function", "crc16")
        .start();
    let mut c = s.conn();
    assert_eq!(slots_info_field(&mut c, "slots_hash_function"), "crc16");
    assert_eq!(slots_info_field(&mut c, "slots_index_mode"), "counts-only");
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("slots.step-budget-us")
        .query(&mut c)
        .unwrap();
    assert_eq!(v[1], "123");
}

#[test]
fn zero_step_budget_still_progresses() {
    let s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("zb", 2000));
    if run(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "0"]).is_ok() {
        ok(
            &mut c,
            &["SLOTS.DEL".to_string(), H.slot(b"zb").to_string()],
        );
        wait_del_done(&mut c);
        assert_eq!(dbsize(&mut c), 0);
    }
    check(&mut c);
}

#[test]
fn commands_inside_multi_and_lua() {
    let mut s = Server::start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("ml", 5));
    let ms = H.slot(b"ml");
    // Read commands work from Lua and MULTI.
    let n = as_int(&ok(
        &mut c,
        &[
            "EVAL",
            "return redis.call('SLOTS.COUNT', ARGV[1])",
            "0",
            &ms.to_string(),
        ],
    ));
    assert_eq!(n, 5);
    let e = run(
        &mut c,
        &["EVAL", "return redis.call('SLOTS.COUNT', 'abc')", "0"],
    );
    assert!(e.is_err());
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SLOTS.COUNT")
        .arg(ms)
        .cmd("SLOTS.INFO")
        .cmd("SLOTS.CHECK");
    let v: redis::Value = p.query(&mut c).unwrap();
    let a = as_array(&v);
    assert_eq!(as_int(&a[0]), 5);
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SLOTS.COUNT")
        .arg("abc")
        .cmd("SLOTS.COUNT")
        .arg(ms);
    let _ = p.query::<redis::Value>(&mut c);
    s.assert_alive("slots commands in MULTI/Lua");
    check(&mut c);
}

#[test]
fn many_args_and_long_keys() {
    let mut s = Server::start();
    let mut c = s.conn();
    let long = vec![b'k'; 1 << 20];
    ok(&mut c, &[b"SET".as_slice(), &long, b"v"]);
    assert_eq!(hashkey(&mut c, &long), H.slot(&long));
    let mut args: Vec<Vec<u8>> = vec![b"SLOTS.HASHKEY".to_vec()];
    args.extend((0..10_000).map(|i| format!("k{i}").into_bytes()));
    let v = ok(&mut c, &args);
    assert_eq!(as_array(&v).len(), 10_000);
    let mut args: Vec<String> = vec!["SLOTS.DEL".into()];
    args.extend((0..1024).chain(0..1024).map(|i| i.to_string()));
    let v = ok(&mut c, &args);
    assert_eq!(as_array(&v).len(), 2048);
    wait_del_done(&mut c);
    assert_eq!(dbsize(&mut c), 0);
    check(&mut c);
    s.assert_alive("many args");
}

/// Error replies that echo client input: characters beyond ASCII (U+0100
/// and most emoji used to crash the server: the reply path squeezed each
/// character into one byte, some into a NUL, and panicked outside the
/// panic guard) and bytes that are not UTF-8 come back escaped, and the
/// server stays up.
#[test]
fn error_replies_echoing_non_ascii_input() {
    let s = Server::start();
    let mut c = s.conn();
    let odd: [&[u8]; 4] = ["Ā".as_bytes(), "😀".as_bytes(), b"\xff\xfe", b"a\r\nb\0c"];
    for o in odd {
        bad(
            &mut c,
            &[&b"SLOTS.MIGRATE"[..], b"127.0.0.1", b"1", o, b"SLOTS", b"0"],
            "",
        );
        bad(
            &mut c,
            &[&b"SLOTS.RESTORE"[..], b"1", b"s", b"1", o, b"k"],
            "unknown opcode",
        );
        bad(&mut c, &[&b"SLOTS.COUNT"[..], o], "");
        bad(&mut c, &[&b"SLOTS.REDIRECT"[..], o], "");
    }
    // The escaped text is still readable.
    let e = err_text(
        &run(
            &mut c,
            &[
                &b"SLOTS.RESTORE"[..],
                b"1",
                b"s",
                b"1",
                "Ā".as_bytes(),
                b"k",
            ],
        )
        .unwrap_err(),
    );
    assert!(e.contains("\\xc4\\x80"), "{e}");
}
