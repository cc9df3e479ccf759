//! Replication and persistence during async migration (MIGRATION.md): the
//! source's deletes and the target's restores (including chunked big keys,
//! as one transaction per batch) reach replicas and the AOF.

use slotfork_tests::migrate::*;
use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn assert_replica_same(p: &Server, r: &Server, ctx: &str) {
    wait_replica_sync(p, r);
    let mut pc = p.conn();
    let mut rc = r.conn();
    assert_eq!(
        dbsize(&mut pc),
        dbsize(&mut rc),
        "{ctx}: DBSIZE primary vs replica"
    );
    assert_eq!(
        digest(&mut pc),
        digest(&mut rc),
        "{ctx}: DEBUG DIGEST primary vs replica"
    );
    // entries-read / lag: see without_entries_read (a Redis 7.0 limitation).
    assert_same_data(
        &without_entries_read(&snap_db(&mut pc)),
        &without_entries_read(&snap_db(&mut rc)),
        ctx,
    );
    assert_eq!(
        slots_info(&mut pc),
        slots_info(&mut rc),
        "{ctx}: SLOTS.INFO"
    );
    check(&mut rc);
}

#[test]
fn replicas_of_source_and_target_follow() {
    let a = Server::start();
    let b = Server::start();
    let ar = Server::builder().replica_of(&a).start();
    let br = Server::builder().replica_of(&b).start();
    let mut ac = a.conn();
    let slots = [400u32, 401];
    let mut keys = Vec::new();
    for &s in &slots {
        keys.extend(populate_types(&mut ac, &tag_for_slot(H, s), 10));
    }
    set_many(&mut ac, &tagged_keys("stays", 30));
    let before = snap_keys(&mut ac, &keys);
    assert_replica_same(&a, &ar, "source before the job");
    assert_replica_same(&b, &br, "target before the job");
    let s = migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &slots);
    assert!(s.num("big_keys") > 0, "{s:?}");
    assert_replica_same(&a, &ar, "source replica after the job");
    assert_replica_same(&b, &br, "target replica after the job");
    let mut brc = br.conn();
    assert_same_data(
        &before,
        &snap_db(&mut brc),
        "target replica holds the moved keys",
    );
    assert_eq!(
        dbsize(&mut ar.conn()),
        30,
        "source replica: the moved keys are deleted"
    );
    assert!(staging_keys(&mut brc).is_empty());
}

#[test]
fn replicas_follow_a_cancelled_big_key_transfer() {
    let a = Server::start();
    let b = Server::start();
    let br = Server::builder().replica_of(&b).start();
    let mut ac = a.conn();
    let mut bc = b.conn();
    let slot = 402;
    let key = format!("{{{}}}:big", tag_for_slot(H, slot));
    fill_big(&mut ac, &key, "hash", 100_000);
    throttle(&mut ac, 0, 300_000);
    let id = migrate_slots(&mut ac, b.port, &["MAXBULKS", "100"], &[slot]);
    wait_until(LONG, "a staging key on the target", || {
        !staging_keys(&mut bc).is_empty()
    });
    ok(&mut ac, &["SLOTS.MIGRATE.CANCEL", &id.to_string()]);
    wait_replica_sync(&b, &br);
    let mut brc = br.conn();
    assert_eq!(
        as_int(&ok(&mut brc, &["EXISTS", &key])),
        0,
        "half key visible on the target's replica"
    );
    assert_eq!(
        staging_keys(&mut brc),
        staging_keys(&mut bc),
        "staging keys replicated"
    );
    for s in staging_keys(&mut brc) {
        let ttl = as_int(&ok(&mut brc, &[b"PEXPIRETIME".as_slice(), &s]));
        assert!(ttl > 0, "staging key on the replica carries its expiry");
    }
    assert_eq!(digest(&mut bc), digest(&mut brc));
}

#[test]
fn target_aof_reload_gives_the_same_data() {
    let a = Server::start();
    let mut b = Server::builder()
        .appendonly(true)
        .config("appendfsync always")
        .start();
    let mut ac = a.conn();
    let slots = [410u32, 411];
    let mut keys = Vec::new();
    for &s in &slots {
        keys.extend(populate_types(&mut ac, &tag_for_slot(H, s), 10));
    }
    let before = snap_keys(&mut ac, &keys);
    migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &slots);
    let mut bc = b.conn();
    let d = digest(&mut bc);
    let snap = snap_db(&mut bc);
    assert_same_data(&before, &snap, "target after the job");
    drop(bc);
    b.restart(Stop::Kill);
    let mut bc = b.conn();
    assert_eq!(digest(&mut bc), d, "DEBUG DIGEST after reloading the AOF");
    assert_same_data(&snap, &snap_db(&mut bc), "target after reloading the AOF");
    assert_exact(&mut bc, H);
    // The AOF, rewritten, reloads to the same data too.
    ok(&mut bc, &["BGREWRITEAOF"]);
    wait_until(LONG, "AOF rewrite to finish", || {
        let i = info(&mut bc, "persistence");
        i["aof_rewrite_in_progress"] == "0" && i["aof_rewrite_scheduled"] == "0"
    });
    ok(&mut bc, &["DEBUG", "LOADAOF"]);
    assert_eq!(digest(&mut bc), d, "after BGREWRITEAOF + DEBUG LOADAOF");
}

#[test]
fn source_aof_reload_has_the_deletes() {
    let mut a = Server::builder()
        .appendonly(true)
        .config("appendfsync always")
        .start();
    let b = Server::start();
    let mut ac = a.conn();
    set_many(&mut ac, &tagged_keys(&tag_for_slot(H, 420), 100));
    set_many(&mut ac, &tagged_keys("stays", 10));
    fill_big(
        &mut ac,
        &format!("{{{}}}:big", tag_for_slot(H, 420)),
        "zset",
        5000,
    );
    migrate_slots_done(&a, &b, &["MAXBULKS", "100"], &[420]);
    let d = digest(&mut ac);
    drop(ac);
    a.restart(Stop::Kill);
    let mut ac = a.conn();
    assert_eq!(digest(&mut ac), d);
    assert_eq!(dbsize(&mut ac), 10);
    assert_exact(&mut ac, H);
}

/// FAILOVER in the middle of a job: the source becomes a replica of its
/// former replica (partial resync, no load). The job must stop without
/// deleting anything more -- a replica's data is its primary's, and a delete
/// there would leave the key on the new primary and on the target at once
/// while the replica diverges. Afterwards the old source equals the new
/// primary, every key is intact on the new primary or the target (or both,
/// for keys acknowledged but not yet deleted), and a job from the new
/// primary finishes the move.
#[test]
fn source_failover_mid_job_abandons_the_job() {
    let a = Server::start();
    let b = Server::start();
    let ar = Server::builder().replica_of(&a).start();
    let mut ac = a.conn();
    let slot = 420u32;
    let keys = tagged_keys(&tag_for_slot(H, slot), 3000);
    set_many(&mut ac, &keys);
    let before = snap_keys(&mut ac, &keys);
    wait_replica_sync(&a, &ar);
    throttle(&mut ac, 1000, 0);
    let id = migrate_slots(&mut ac, b.port, &[], &[slot]);
    wait_status(&mut ac, id, "some keys moved", |s| {
        s.num("keys_moved") >= 300
    });
    ok(&mut ac, &["FAILOVER", "TIMEOUT", "10000"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while info(&mut ac, "replication").get("role").map(String::as_str) != Some("slave") {
        assert!(
            std::time::Instant::now() < deadline,
            "FAILOVER did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let s = finish(&a, id);
    assert_eq!(s.state(), "failed", "{s:?}");
    assert!(s.get("last_error").contains("replica"), "{s:?}");
    assert!(s.num("keys_moved") < keys.len() as i64, "{s:?}");
    // The old source follows the new primary and deleted nothing of its own.
    assert_replica_same(&ar, &a, "old source after the failover");
    let mut arc = ar.conn();
    let u = union_consistent(
        &snap_db(&mut arc),
        &snap_db(&mut b.conn()),
        "new primary + target",
    );
    assert_same_data(&before, &u, "nothing lost across the failover");
    migrate_slots_done(&ar, &b, &[], &[slot]);
    assert_same_data(&before, &snap_db(&mut b.conn()), "target after the new job");
    assert_eq!(dbsize(&mut arc), 0);
}
