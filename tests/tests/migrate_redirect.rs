//! Redirection while a job runs (MIGRATION.md): a key no longer on the
//! source -> `-ASK <slot> <host>:<port>`; a command whose keys are partly
//! here and partly moved -> `-TRYAGAIN`. Jobs are throttled to a few keys/s
//! so that some keys have moved and others not.

use std::time::Duration;

use redis::ErrorKind;
use slotfork_tests::migrate::*;
use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

/// Split `keys` into (moved, here) by asking the source: GET answers the
/// value or -ASK. Checks the ASK text and that a moved key is on the target.
fn classify(
    src: &mut redis::Connection,
    dst: &mut redis::Connection,
    keys: &[String],
    hash: HashFn,
    port: u16,
) -> (Vec<String>, Vec<String>) {
    let mut moved = Vec::new();
    let mut here = Vec::new();
    for k in keys {
        match run(src, &["GET", k.as_str()]) {
            Ok(v) => {
                assert_eq!(as_string(&v), format!("val:{k}"), "{k} still on the source");
                here.push(k.clone());
            }
            Err(e) if e.kind() == ErrorKind::Ask => {
                assert_eq!(
                    err_text(&e),
                    format!("ASK {} 127.0.0.1:{port}", hash.slot(k.as_bytes())),
                    "ASK reply for {k}"
                );
                assert_eq!(
                    as_string(&ok(dst, &["GET", k.as_str()])),
                    format!("val:{k}"),
                    "{k}: -ASK from the source but not on the target"
                );
                moved.push(k.clone());
            }
            Err(e) => panic!("GET {k}: unexpected error {}", err_text(&e)),
        }
    }
    (moved, here)
}

/// Wait until at least `n` keys have moved and then for the next move, so
/// that the checks that follow run right after a move: with the job
/// throttled to 1 key/s, the keys seen "here" stay here for about a second.
fn just_after_a_move(c: &mut redis::Connection, id: i64, n: i64) {
    let s = wait_status(c, id, "keys_moved >= n", |s| s.num("keys_moved") >= n);
    let m = s.num("keys_moved");
    wait_status(c, id, "the next move", |s| s.num("keys_moved") > m);
}

/// Multi-key commands over a moved key `m` and a key `h` still here: each
/// must answer -TRYAGAIN and change nothing.
fn mixed_checks(c: &mut redis::Connection, m: &str, h: &str) -> Result<(), String> {
    for args in [
        vec!["MGET", m, h],
        vec!["MGET", h, m],
        vec!["DEL", h, m],
        vec!["MSET", h, "1", m, "2"],
        vec!["EXISTS", m, h],
        vec!["RENAME", h, m],
    ] {
        match run(c, &args) {
            Err(e) if e.kind() == ErrorKind::TryAgain => {}
            Err(e) => return Err(format!("{args:?} -> {}, expected -TRYAGAIN", err_text(&e))),
            Ok(v) => return Err(format!("{args:?} -> {v:?}, expected -TRYAGAIN")),
        }
    }
    Ok(())
}

fn fill(c: &mut redis::Connection, keys: &[String]) {
    for k in keys {
        ok(c, &["SET", k.as_str(), &format!("val:{k}")]);
    }
}

fn expect_kind(c: &mut redis::Connection, args: &[&str], kind: ErrorKind, what: &str) -> String {
    match run(c, args) {
        Err(e) if e.kind() == kind => err_text(&e),
        Err(e) => panic!("{what}: {args:?} -> {}, expected {kind:?}", err_text(&e)),
        Ok(v) => panic!("{what}: {args:?} -> {v:?}, expected {kind:?}"),
    }
}

#[test]
fn ask_and_tryagain_during_a_slot_job() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = 5;
    let tag = tag_for_slot(H, slot);
    let keys = tagged_keys(&tag, 20);
    fill(&mut ac, &keys);
    let other = "{elsewhere}:k".to_string();
    assert_ne!(H.slot(b"elsewhere"), slot);
    ok(&mut ac, &["SET", &other, "o"]);
    throttle(&mut ac, 1, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[slot]);
    just_after_a_move(&mut ac, id, 1);
    let (moved, here) = classify(&mut ac, &mut bc, &keys, H, b.port);
    assert!(moved.len() >= 2, "moved {moved:?}");
    assert!(
        here.len() >= 5,
        "a job at 1 key/s cannot have moved everything: here {here:?}"
    );
    let m = moved[0].as_str();
    let m2 = moved[1].as_str();
    let ask = format!("ASK {slot} 127.0.0.1:{}", b.port);

    // Reads and writes of a moved key -> ASK.
    for args in [
        vec!["GET", m],
        vec!["SET", m, "new"],
        vec!["EXISTS", m],
        vec!["DEL", m],
        vec!["INCR", m],
        vec!["EXPIRE", m, "100"],
        vec!["TYPE", m],
    ] {
        assert_eq!(
            expect_kind(&mut ac, &args, ErrorKind::Ask, "moved key"),
            ask,
            "{args:?}"
        );
    }
    // The moved key is untouched on the target by those (they were redirected).
    assert_eq!(as_string(&ok(&mut bc, &["GET", m])), format!("val:{m}"));
    assert_eq!(as_int(&ok(&mut bc, &["PEXPIRETIME", m])), -1);

    // All keys moved -> ASK.
    assert_eq!(
        expect_kind(&mut ac, &["MGET", m, m2], ErrorKind::Ask, "all keys moved"),
        ask
    );
    // Some moved, some here -> TRYAGAIN. `h` must stay here during these
    // checks: if it moved meanwhile (a very slow machine), they are redone
    // right after the next move with a key still here.
    let mut h = here.last().unwrap().clone();
    let mut attempts = 0;
    loop {
        let res = mixed_checks(&mut ac, m, &h);
        let still_here = matches!(run(&mut ac, &["GET", h.as_str()]),
            Ok(v) if as_string(&v) == format!("val:{h}"));
        if still_here {
            if let Err(e) = res {
                panic!("{e}");
            }
            break;
        }
        attempts += 1;
        assert!(attempts < 5, "{h} kept moving during the checks");
        just_after_a_move(&mut ac, id, 0);
        let (_, here2) = classify(&mut ac, &mut bc, &keys, H, b.port);
        h = here2.last().expect("a key still here").clone();
    }
    // Nothing was changed by the refused commands.
    assert_eq!(as_string(&ok(&mut bc, &["GET", m])), format!("val:{m}"));

    // Keys of other slots are served.
    assert_eq!(as_string(&ok(&mut ac, &["GET", &other])), "o");
    ok(&mut ac, &["SET", &other, "o2"]);
    ok(&mut ac, &["MGET", &other, "{elsewhere}:missing"]);

    // A key of the slot that exists nowhere: ASK (as Redis Cluster) or served
    // here; if it is created here, the job must still move it.
    let fresh = format!("{{{tag}}}:fresh");
    let fresh_on_source = match run(&mut ac, &["SET", fresh.as_str(), "f"]) {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::Ask => {
            assert_eq!(err_text(&e), ask);
            ok(&mut bc, &["SET", fresh.as_str(), "f"]);
            false
        }
        Err(e) => panic!("SET of a new key in a migrating slot: {}", err_text(&e)),
    };
    eprintln!("new key in a migrating slot created on the source: {fresh_on_source}");

    throttle(&mut ac, 0, 0);
    finish_done(&a, id);
    // Everything is on the target; the source kept only the other slot.
    for k in &keys {
        assert_eq!(
            as_string(&ok(&mut bc, &["GET", k.as_str()])),
            format!("val:{k}")
        );
    }
    assert_eq!(as_string(&ok(&mut bc, &["GET", fresh.as_str()])), "f");
    assert_eq!(all_keys(&mut ac), vec![other.clone().into_bytes()]);
    // After the job, the source answers normally again (no ASK).
    assert_eq!(ok(&mut ac, &["GET", m]), redis::Value::Nil);
}

#[test]
fn no_redirection_after_cancel() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = 6;
    let keys = tagged_keys(&tag_for_slot(H, slot), 20);
    fill(&mut ac, &keys);
    throttle(&mut ac, 1, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[slot]);
    just_after_a_move(&mut ac, id, 0);
    ok(&mut ac, &["SLOTS.MIGRATE.CANCEL", &id.to_string()]);
    let st_at_cancel = status(&mut ac, id);
    assert_eq!(wait_job(&mut ac, id, 10_000), "cancelled");
    // No ASK any more: a moved key is simply absent on the source (and on
    // the target), a key still here is served.
    let (mut moved, mut here) = (0, 0);
    for k in &keys {
        match run(&mut ac, &["GET", k.as_str()]) {
            Ok(redis::Value::Nil) => {
                assert_eq!(
                    as_string(&ok(&mut bc, &["GET", k.as_str()])),
                    format!("val:{k}"),
                    "{k} is on neither server"
                );
                moved += 1;
            }
            Ok(v) => {
                assert_eq!(as_string(&v), format!("val:{k}"));
                here += 1;
            }
            Err(e) => panic!(
                "GET {k} after CANCEL: {} (no redirection once cancelled)",
                err_text(&e)
            ),
        }
    }
    assert!(moved >= 1 && here >= 1, "moved {moved}, here {here}");
    ok(&mut ac, &["MGET", keys[0].as_str(), keys[19].as_str()]);
    assert_eq!(
        st_at_cancel.state(),
        "cancelled",
        "STATUS right after CANCEL replied OK (the job stops at once): {st_at_cancel:?}"
    );
}

#[test]
fn ask_during_a_key_job() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = H.slot(b"grp");
    let group = tagged_keys("grp", 12);
    fill(&mut ac, &group);
    // Same slot, not part of the job.
    let outside = plain_keys_in_slot(H, slot, "outside", 3);
    fill(&mut ac, &outside);
    throttle(&mut ac, 1, 0);
    let id = migrate_keys(&mut ac, b.port, &[], &group);
    just_after_a_move(&mut ac, id, 1);
    let (moved, here) = classify(&mut ac, &mut bc, &group, H, b.port);
    assert!(
        moved.len() >= 2 && !here.is_empty(),
        "moved {moved:?} here {here:?}"
    );
    let (om, oh) = classify(&mut ac, &mut bc, &outside, H, b.port);
    assert!(
        om.is_empty(),
        "keys outside a key job are never redirected: {om:?}"
    );
    assert_eq!(oh.len(), 3);
    expect_kind(
        &mut ac,
        &["MGET", moved[0].as_str(), outside[0].as_str()],
        ErrorKind::TryAgain,
        "moved key + key outside the job",
    );
    throttle(&mut ac, 0, 0);
    finish_done(&a, id);
    assert_eq!(dbsize(&mut ac), 3);
    assert_eq!(dbsize(&mut bc), 12);
}

#[test]
fn ask_slot_number_with_crc16() {
    let a = Server::builder().crc16().start();
    let b = Server::builder().crc16().start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = HashFn::Crc16.slot(b"foo");
    assert_eq!(slot, 12182);
    let mut keys = plain_keys_in_slot(HashFn::Crc16, slot, "k", 15);
    keys.push("foo".into());
    keys.push("{foo}:x".into());
    fill(&mut ac, &keys);
    throttle(&mut ac, 1, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[slot]);
    just_after_a_move(&mut ac, id, 2);
    let (moved, here) = classify(&mut ac, &mut bc, &keys, HashFn::Crc16, b.port);
    assert!(moved.len() >= 3, "{moved:?} {here:?}");
    throttle(&mut ac, 0, 0);
    finish_done(&a, id);
    assert_eq!(dbsize(&mut bc) as usize, keys.len());
}

#[test]
fn ask_in_a_nonzero_database() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn_db(4);
    let mut bc = b.conn_db(4);
    let slot = 7;
    let keys = tagged_keys(&tag_for_slot(H, slot), 15);
    fill(&mut ac, &keys);
    throttle(&mut ac, 1, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[slot]);
    just_after_a_move(&mut ac, id, 1);
    let (moved, _here) = classify(&mut ac, &mut bc, &keys, H, b.port);
    assert!(moved.len() >= 2);
    throttle(&mut ac, 0, 0);
    finish_done(&a, id);
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(dbsize(&mut bc), 15);
    assert_eq!(dbsize(&mut b.conn()), 0);
}

/// MULTI/EXEC and scripts must not bypass redirection: a write to a moved
/// key inside a transaction or a script may fail (ASK, TRYAGAIN, EXECABORT,
/// a script error), but it must not recreate the key on the source, where
/// it would then live on two servers.
#[test]
fn transactions_and_scripts_do_not_bypass_redirection() {
    let a = Server::start();
    let b = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = 8;
    let keys = tagged_keys(&tag_for_slot(H, slot), 20);
    fill(&mut ac, &keys);
    throttle(&mut ac, 1, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[slot]);
    just_after_a_move(&mut ac, id, 2);
    let (moved, _) = classify(&mut ac, &mut bc, &keys, H, b.port);
    let m = moved[0].clone();
    let m2 = moved[1].clone();
    // MULTI / SET moved / EXEC.
    let mut outcomes = Vec::new();
    let r1 = run(&mut ac, &["MULTI"]);
    let r2 = run(&mut ac, &["SET", m.as_str(), "from-multi"]);
    let r3 = run(&mut ac, &["EXEC"]);
    outcomes.push(format!("MULTI {r1:?} / SET {r2:?} / EXEC {r3:?}"));
    // EVAL writing a moved key declared in KEYS.
    let r4 = run(
        &mut ac,
        &[
            "EVAL",
            "return redis.call('SET', KEYS[1], 'from-script')",
            "1",
            m2.as_str(),
        ],
    );
    outcomes.push(format!("EVAL {r4:?}"));
    // A script writing a moved key it did not declare.
    let m3 = moved.get(2).cloned();
    if let Some(m3) = &m3 {
        let r5 = run(
            &mut ac,
            &[
                "EVAL",
                "return redis.call('SET', ARGV[1], 'undeclared')",
                "0",
                m3.as_str(),
            ],
        );
        outcomes.push(format!("EVAL undeclared {r5:?}"));
    }
    eprintln!("{outcomes:#?}");
    for k in [Some(&m), Some(&m2), m3.as_ref()].into_iter().flatten() {
        // While the job runs, GET answers ASK if the key is not on the source.
        match run(&mut ac, &["GET", k.as_str()]) {
            Err(e) if e.kind() == ErrorKind::Ask => {}
            other => panic!(
                "{k} was recreated on the source by a transaction or a script: GET -> {other:?}; {outcomes:?}"
            ),
        }
        assert_eq!(
            as_string(&ok(&mut bc, &["GET", k.as_str()])),
            format!("val:{k}"),
            "{k} on the target"
        );
    }
    throttle(&mut ac, 0, 0);
    finish_done(&a, id);
    assert!(
        user_keys(&mut ac).is_empty(),
        "{:?}",
        user_keys(&mut ac)
            .iter()
            .map(|k| show(k))
            .collect::<Vec<_>>()
    );
}
