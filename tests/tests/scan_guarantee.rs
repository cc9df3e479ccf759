//! SLOTS.SCAN's guarantee: a key present during the whole scan is returned at
//! least once, while keys are added and removed between calls (which makes
//! the underlying tables grow, shrink and rehash).

use std::collections::{BTreeSet, VecDeque};

use rand::{Rng, SeedableRng};
use slotfork_tests::*;

/// `stable` keys stay for the whole scan; `transient` keys exist at the start
/// and are removed during it; new keys are added and removed all the time.
fn run_scan(s: &Server, hash: HashFn, stable: usize, transient: usize, grow: usize, count: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("scan_guarantee"));
    let mut c = s.conn();
    let tag = "sg";
    let slot = hash.slot(tag.as_bytes());
    let stable_keys: Vec<String> = (0..stable)
        .map(|i| format!("{{{tag}}}:stable:{i}"))
        .collect();
    set_many(&mut c, &stable_keys);
    let mut transient_keys: Vec<String> = (0..transient)
        .map(|i| format!("{{{tag}}}:tr:{i}"))
        .collect();
    set_many(&mut c, &transient_keys);
    // Noise in other slots.
    set_many(
        &mut c,
        &(0..2000).map(|i| format!("noise:{i}")).collect::<Vec<_>>(),
    );

    let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut live_new: VecDeque<String> = VecDeque::new();
    let mut next_new = 0usize;
    let mut cursor = "0".to_string();
    let mut calls = 0usize;
    loop {
        let (next, keys) = slots_scan_once(&mut c, slot, &cursor, Some(count));
        calls += 1;
        for k in keys {
            assert_eq!(
                hash.slot(&k),
                slot,
                "SLOTS.SCAN returned a key of another slot: {:?}",
                String::from_utf8_lossy(&k)
            );
            seen.insert(k);
        }
        if next == "0" {
            break;
        }
        cursor = next;
        assert!(
            calls < 200_000,
            "SLOTS.SCAN did not finish after {calls} calls"
        );

        // Mutate between calls.
        let mut p = redis::pipe();
        for _ in 0..rng.gen_range(0..=grow) {
            let k = format!("{{{tag}}}:new:{next_new}");
            next_new += 1;
            p.cmd("SET").arg(&k).arg("v").ignore();
            live_new.push_back(k);
        }
        for _ in 0..rng.gen_range(0..=grow / 2 + 1) {
            if let Some(k) = live_new.pop_front() {
                p.cmd("DEL").arg(k).ignore();
            }
        }
        for _ in 0..rng.gen_range(0..=transient / 200 + 1) {
            if transient_keys.is_empty() {
                break;
            }
            let i = rng.gen_range(0..transient_keys.len());
            let k = transient_keys.swap_remove(i);
            p.cmd("UNLINK").arg(k).ignore();
        }
        p.cmd("SET")
            .arg(format!("noise:x{calls}"))
            .arg("v")
            .ignore();
        let _: () = p.query(&mut c).unwrap();
    }
    let missing: Vec<&String> = stable_keys
        .iter()
        .filter(|k| !seen.contains(k.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {stable} stable keys never returned by SLOTS.SCAN (after {calls} calls), e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    check(&mut c);
    assert_model(&mut c, hash);
}

#[test]
fn scan_while_growing_full() {
    let s = Server::start();
    run_scan(&s, HashFn::Crc32, 1000, 0, 40, 10);
}

#[test]
fn scan_while_shrinking_full() {
    let s = Server::start();
    run_scan(&s, HashFn::Crc32, 300, 20_000, 4, 10);
}

#[test]
fn scan_mixed_full_count1() {
    let s = Server::start();
    run_scan(&s, HashFn::Crc32, 500, 2000, 10, 1);
}

#[test]
fn scan_mixed_full_crc16() {
    let s = Server::builder().crc16().start();
    run_scan(&s, HashFn::Crc16, 500, 3000, 20, 10);
}

#[test]
fn scan_growing_counts_only() {
    let s = Server::builder().counts_only().start();
    run_scan(&s, HashFn::Crc32, 500, 0, 30, 20);
}

#[test]
fn scan_shrinking_counts_only() {
    let s = Server::builder().counts_only().start();
    run_scan(&s, HashFn::Crc32, 200, 10_000, 4, 50);
}

#[test]
fn scan_survives_slot_emptied_and_refilled() {
    // Cursor kept across the slot becoming empty and non-empty again: must
    // not crash, must terminate, must only return keys of the slot.
    let mut s = Server::start();
    let mut c = s.conn();
    let slot = HashFn::Crc32.slot(b"er");
    set_many(&mut c, &tagged_keys("er", 500));
    let (cur, _) = slots_scan_once(&mut c, slot, "0", Some(10));
    assert_ne!(cur, "0");
    let mut del = vec!["DEL".to_string()];
    del.extend(tagged_keys("er", 500));
    ok(&mut c, &del);
    let (cur2, keys) = slots_scan_once(&mut c, slot, &cur, Some(10));
    assert!(keys.is_empty());
    set_many(&mut c, &tagged_keys("er", 50));
    if cur2 != "0" {
        let mut cur = cur2;
        for _ in 0..10_000 {
            let (n, keys) = slots_scan_once(&mut c, slot, &cur, Some(10));
            assert!(keys.iter().all(|k| HashFn::Crc32.slot(k) == slot));
            if n == "0" {
                break;
            }
            cur = n;
        }
    }
    // A stale / made-up cursor must not crash the server either.
    for bogus in ["1", "12345", "999999999", "18446744073709551615"] {
        let _ = run(
            &mut c,
            &[
                "SLOTS.SCAN".to_string(),
                slot.to_string(),
                bogus.to_string(),
            ],
        );
        let _ = run(
            &mut c,
            &["SLOTS.SCAN".to_string(), "3".to_string(), bogus.to_string()],
        );
    }
    s.assert_alive("SLOTS.SCAN with stale cursors");
}

/// Keys present throughout are still all returned when the index is rebuilt
/// (DEBUG RELOAD) in the middle of a scan.
fn scan_across_reload(s: &Server, hash: HashFn) {
    let mut c = s.conn();
    let slot = hash.slot(b"rl");
    let stable = tagged_keys("rl", 3000);
    set_many(&mut c, &stable);
    set_many(
        &mut c,
        &(0..3000).map(|i| format!("other:{i}")).collect::<Vec<_>>(),
    );
    let mut seen = BTreeSet::new();
    let mut cursor = "0".to_string();
    let mut calls = 0;
    loop {
        let (next, keys) = slots_scan_once(&mut c, slot, &cursor, Some(10));
        seen.extend(keys);
        calls += 1;
        if calls == 20 {
            ok(&mut c, &["DEBUG", "RELOAD"]);
        }
        if calls == 40 {
            // Shrink then grow the slot around the stable keys.
            let extra = tagged_keys("rl", 6000);
            set_many(&mut c, &extra[3000..]);
            let mut del = vec!["DEL".to_string()];
            del.extend(extra[3000..].iter().cloned());
            ok(&mut c, &del);
        }
        if next == "0" {
            break;
        }
        cursor = next;
        assert!(calls < 100_000, "scan did not finish");
    }
    let missing = stable
        .iter()
        .filter(|k| !seen.contains(k.as_bytes()))
        .count();
    assert_eq!(
        missing, 0,
        "{missing} stable keys missed by a scan spanning DEBUG RELOAD"
    );
}

#[test]
fn scan_across_debug_reload_full() {
    let s = Server::start();
    scan_across_reload(&s, HashFn::Crc32);
}

#[test]
fn scan_across_debug_reload_counts_only() {
    let s = Server::builder().counts_only().start();
    scan_across_reload(&s, HashFn::Crc32);
}

/// Scan a big slot while its key table is being rehashed over many cron
/// ticks (small step budget): growth from 60k keys, or shrinking from 125k
/// down to 5k. The rehash is incremental, so many SLOTS.SCAN calls see a
/// table in the middle of a resize.
fn scan_during_long_rehash(grow: bool) {
    let s = Server::start();
    let mut c = s.conn();
    let hash = HashFn::Crc32;
    let slot = hash.slot(b"rh");
    let (stable_n, transient_n) = if grow { (60_000, 0) } else { (5_000, 120_000) };
    let stable: Vec<String> = (0..stable_n).map(|i| format!("{{rh}}:s{i}")).collect();
    set_many(&mut c, &stable);
    let transient: Vec<String> = (0..transient_n).map(|i| format!("{{rh}}:t{i}")).collect();
    set_many(&mut c, &transient);
    // Let the rehashes of the fill finish, then slow the cron's down.
    std::thread::sleep(std::time::Duration::from_millis(500));
    ok(&mut c, &["CONFIG", "SET", "slots.step-budget-us", "50"]);
    let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut cursor = "0".to_string();
    let mut calls = 0usize;
    let mut added = 0usize;
    let mut removed = 0usize;
    loop {
        let (next, keys) = slots_scan_once(&mut c, slot, &cursor, Some(200));
        calls += 1;
        seen.extend(keys);
        if next == "0" {
            break;
        }
        cursor = next;
        assert!(calls < 100_000, "scan did not finish");
        let mut p = redis::pipe();
        if grow && added < 40_000 {
            for i in added..added + 400 {
                p.cmd("SET").arg(format!("{{rh}}:n{i}")).arg("v").ignore();
            }
            added += 400;
        }
        if !grow && removed < transient.len() {
            let end = (removed + 3000).min(transient.len());
            p.cmd("UNLINK").arg(&transient[removed..end]).ignore();
            removed = end;
        }
        p.cmd("PING").ignore();
        let _: () = p.query(&mut c).unwrap();
    }
    let missing: Vec<&String> = stable
        .iter()
        .filter(|k| !seen.contains(k.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} stable keys never returned by SLOTS.SCAN during a {} rehash ({calls} calls), e.g. {:?}",
        missing.len(),
        stable.len(),
        if grow { "growing" } else { "shrinking" },
        &missing[..missing.len().min(5)]
    );
    check(&mut c);
}

#[test]
fn scan_during_long_rehash_grow() {
    scan_during_long_rehash(true);
}

#[test]
fn scan_during_long_rehash_shrink() {
    scan_during_long_rehash(false);
}
