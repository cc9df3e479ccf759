//! Three servers (MIGRATION.md): A -> B, then B -> C for the same slots;
//! two jobs from A to B and to C in parallel on different slots; a target
//! that is at the same time the source of another job.

use slotfork_tests::migrate::*;
use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn dataset(c: &mut redis::Connection, slots: &[u32], scale: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for &s in slots {
        let t = tag_for_slot(H, s);
        keys.extend(populate_types(c, &t, scale));
        let plain = plain_keys_in_slot(H, s, "p", 30);
        set_many(c, &plain);
        keys.extend(plain);
    }
    keys
}

#[test]
fn a_to_b_then_b_to_c() {
    let a = Server::start();
    let b = Server::start();
    let c = Server::start();
    let mut ac = a.conn();
    let slots = [500u32, 501, 502];
    let keys = dataset(&mut ac, &slots, 5);
    let before = snap_keys(&mut ac, &keys);
    migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &slots);
    let mut bc = b.conn();
    assert_same_data(&before, &snap_db(&mut bc), "B after A -> B");
    assert_eq!(dbsize(&mut ac), 0);
    migrate_slots_done(&b, &c, &["MAXBULKS", "100", "PARALLEL", "2"], &slots);
    let mut cc = c.conn();
    assert_same_data(&before, &snap_db(&mut cc), "C after B -> C");
    assert_eq!(dbsize(&mut bc), 0);
    assert!(staging_keys(&mut bc).is_empty() && staging_keys(&mut cc).is_empty());
    for s in [&a, &b, &c] {
        assert_exact(&mut s.conn(), H);
    }
    // And back to A.
    migrate_slots_done(&c, &a, &[], &slots);
    assert_same_data(&before, &snap_db(&mut ac), "A after C -> A");
}

#[test]
fn parallel_jobs_to_two_targets() {
    let a = Server::start();
    let b = Server::start();
    let c = Server::start();
    let mut ac = a.conn();
    let to_b = [510u32, 511];
    let to_c = [520u32, 521];
    let kb = dataset(&mut ac, &to_b, 5);
    let kc = dataset(&mut ac, &to_c, 5);
    set_many(&mut ac, &tagged_keys("stays", 20));
    let before_b = snap_keys(&mut ac, &kb);
    let before_c = snap_keys(&mut ac, &kc);
    // Throttled at first so that both jobs certainly overlap.
    throttle(&mut ac, 50, 0);
    let jb = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &to_b);
    let jc = migrate_slots(&mut ac, c.port, &["MAXBULKS", "100"], &to_c);
    assert_ne!(jb, jc);
    let sb = status(&mut ac, jb);
    let sc = status(&mut ac, jc);
    assert_eq!(
        (sb.state(), sc.state()),
        ("running", "running"),
        "{sb:?} {sc:?}"
    );
    let running: Vec<i64> = status_all(&mut ac)
        .iter()
        .filter(|s| s.state() == "running")
        .map(|s| s.num("id"))
        .collect();
    assert!(
        running.contains(&jb) && running.contains(&jc),
        "{running:?}"
    );
    wait_status(&mut ac, jb, "some progress", |s| s.num("keys_moved") > 0);
    throttle(&mut ac, 0, 0);
    let sb = finish_done(&a, jb);
    let sc = finish_done(&a, jc);
    assert_eq!(sb.get("target"), format!("127.0.0.1:{}", b.port));
    assert_eq!(sc.get("target"), format!("127.0.0.1:{}", c.port));
    assert_same_data(&before_b, &snap_db(&mut b.conn()), "B");
    assert_same_data(&before_c, &snap_db(&mut c.conn()), "C");
    assert_eq!(dbsize(&mut ac), 20);
    for s in [&a, &b, &c] {
        assert_exact(&mut s.conn(), H);
    }
}

#[test]
fn chained_jobs_running_at_once() {
    // A -> B on slots X while B -> C on slots Y: B is target and source.
    let a = Server::start();
    let b = Server::start();
    let c = Server::start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let x = [530u32];
    let y = [531u32];
    let kx = dataset(&mut ac, &x, 5);
    let ky = dataset(&mut bc, &y, 5);
    let before_x = snap_keys(&mut ac, &kx);
    let before_y = snap_keys(&mut bc, &ky);
    let j1 = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &x);
    let j2 = migrate_slots(&mut bc, c.port, &["MAXBULKS", "100"], &y);
    finish_done(&a, j1);
    finish_done(&b, j2);
    assert_same_data(&before_x, &snap_db(&mut bc), "B holds X only");
    assert_same_data(&before_y, &snap_db(&mut c.conn()), "C holds Y");
    assert_eq!(dbsize(&mut ac), 0);
}

/// Two jobs for the same slot to two targets: a second job may be refused;
/// if both run, every key still ends up on exactly one server, intact.
#[test]
fn overlapping_jobs_lose_nothing() {
    let a = Server::start();
    let b = Server::start();
    let c = Server::start();
    let mut ac = a.conn();
    let slot = 540u32;
    let keys = dataset(&mut ac, &[slot], 3);
    let before = snap_keys(&mut ac, &keys);
    throttle(&mut ac, 50, 0);
    let j1 = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &[slot]);
    let j2 = match try_migrate_slots(&mut ac, c.port, &["MAXBULKS", "100"], &[slot]) {
        Ok(redis::Value::Int(id)) => Some(id),
        Ok(v) => panic!("unexpected reply {v:?}"),
        Err(e) => {
            eprintln!("second job on a migrating slot refused: {}", err_text(&e));
            None
        }
    };
    throttle(&mut ac, 0, 0);
    let s1 = finish(&a, j1);
    eprintln!("{s1:?}");
    if let Some(j2) = j2 {
        eprintln!("{:?}", finish(&a, j2));
    }
    let sa = snap_db(&mut ac);
    let sb = snap_db(&mut b.conn());
    let sc = snap_db(&mut c.conn());
    for k in before.keys() {
        let n = [&sa, &sb, &sc].iter().filter(|s| s.contains_key(k)).count();
        assert_eq!(n, 1, "{} is on {n} servers", show(k));
    }
    let u = union_consistent(&union_consistent(&sa, &sb, "A+B"), &sc, "A+B+C");
    assert_same_data(&before, &u, "all servers together");
    if j2.is_none() {
        assert_eq!(s1.state(), "done");
        assert_same_data(&before, &sb, "B");
    }
}

/// A slot job is refused while a key job moves a key of one of its slots,
/// and a key job is refused while a slot job moves the key's slot: two jobs
/// sending the same key (to one target or two) could delete each other's
/// copy. Jobs on other slots still start.
#[test]
fn slot_and_key_jobs_on_the_same_slot_are_refused() {
    let a = Server::start();
    let b = Server::start();
    let c = Server::start();
    let mut ac = a.conn();
    let slot = 550u32;
    let keys = tagged_keys(&tag_for_slot(H, slot), 40);
    set_many(&mut ac, &keys);
    let other = tagged_keys(&tag_for_slot(H, slot + 1), 5);
    set_many(&mut ac, &other);
    let before = snap_keys(&mut ac, &keys);
    // Slow enough that the first job is still running when the second
    // command arrives.
    throttle(&mut ac, 5, 0);
    let k = migrate_keys(&mut ac, b.port, &[], &keys[..1]);
    for port in [b.port, c.port] {
        match try_migrate_slots(&mut ac, port, &[], &[slot]) {
            Err(e) => {
                let t = err_text(&e);
                assert!(
                    t.contains("slot 550 is already being migrated by job"),
                    "{t}"
                );
            }
            Ok(v) => panic!("a slot job over key job {k}'s key was accepted: {v:?}"),
        }
    }
    let s = migrate_slots(&mut ac, c.port, &[], &[slot + 1]);
    throttle(&mut ac, 0, 0);
    assert_eq!(finish_done(&a, k).num("keys_moved"), 1);
    finish_done(&a, s);

    throttle(&mut ac, 5, 0);
    let j = migrate_slots(&mut ac, b.port, &[], &[slot]);
    let mut cmd: Vec<String> = ["SLOTS.MIGRATE.KEYS", "127.0.0.1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cmd.push(c.port.to_string());
    cmd.push("KEYS".into());
    cmd.push(keys[5].clone());
    match run(&mut ac, &cmd) {
        Err(e) => assert!(
            err_text(&e).contains("is already being migrated by job"),
            "{}",
            err_text(&e)
        ),
        Ok(v) => panic!("a key job inside slot job {j}'s slot was accepted: {v:?}"),
    }
    throttle(&mut ac, 0, 0);
    finish_done(&a, j);
    assert_same_data(&before, &snap_db(&mut b.conn()), "B holds the slot");
    assert_eq!(dbsize(&mut ac), 0);
}
