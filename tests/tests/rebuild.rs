//! The index rebuild after a dataset load runs in the background: the server
//! serves meanwhile, SLOTS.* commands wait for it (or answer -LOADING where a
//! client cannot block), and writes during the rebuild are not lost.

use std::thread;
use std::time::{Duration, Instant};

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

/// A dataset big enough that the rebuild takes many cron steps at the
/// smallest step budget.
fn big_server() -> Server {
    let s = Server::builder()
        .module_arg("step-budget-us", "200")
        .start();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "POPULATE", "100000", "k", "8"]);
    s
}

#[test]
fn commands_wait_for_the_rebuild_and_server_stays_responsive() {
    let s = big_server();
    let mut c = s.conn();
    let want = slots_info(&mut c);
    ok(&mut c, &["DEBUG", "RELOAD"]);
    assert_eq!(
        slots_info_num(&mut c, "slots_index_building"),
        1,
        "a 100k-key rebuild at 200us steps cannot be done yet"
    );
    // Other clients are served while the index is rebuilt.
    let started = Instant::now();
    let mut pings = 0;
    while slots_info_num(&mut c, "slots_index_building") == 1 {
        let t = Instant::now();
        ok(&mut c, &["PING"]);
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "PING took {:?} during the rebuild",
            t.elapsed()
        );
        pings += 1;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rebuild did not end"
        );
    }
    assert!(pings > 0);
    // A SLOTS command sent during a rebuild blocks and then answers from the
    // complete index.
    ok(&mut c, &["DEBUG", "RELOAD"]);
    let mut c2 = s.conn();
    assert_eq!(slots_info(&mut c2), want);
    assert_eq!(slots_info_num(&mut c, "slots_index_building"), 0);
    assert_exact(&mut c, H);
}

#[test]
fn loading_error_where_clients_cannot_block() {
    let s = big_server();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "RELOAD"]);
    let mut p = redis::pipe();
    p.atomic().cmd("SLOTS.COUNT").arg(0);
    let r: redis::RedisResult<redis::Value> = p.query(&mut c);
    if slots_info_num(&mut c, "slots_index_building") == 1 {
        let e = r.expect_err("SLOTS.COUNT inside MULTI during a rebuild");
        assert!(
            err_text(&e).contains("LOADING") || format!("{e:?}").contains("Loading"),
            "{e:?}"
        );
    }
    let r = run(
        &mut c,
        &["EVAL", "return redis.call('SLOTS.COUNT', 0)", "0"],
    );
    if let Err(e) = r {
        assert!(format!("{e:?}").to_lowercase().contains("loading"), "{e:?}");
    }
    check(&mut c);
}

#[test]
fn writes_during_the_rebuild_are_indexed() {
    let s = big_server();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "RELOAD"]);
    assert_eq!(slots_info_num(&mut c, "slots_index_building"), 1);
    let url = s.url();
    let writer = thread::spawn(move || {
        let mut w = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut i = 0u64;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            // New keys, deletions of loaded keys, renames across slots.
            ok(&mut w, &["SET", &format!("new:{i}"), "v"]);
            ok(&mut w, &["DEL", &format!("k:{}", i * 7 % 100_000)]);
            // The source may be gone (deleted above): "no such key" is fine.
            let _ = run(
                &mut w,
                &[
                    "RENAME",
                    &format!("k:{}", 50_000 + i),
                    &format!("moved:{i}"),
                ],
            );
            i += 1;
        }
        i
    });
    let n = writer.join().unwrap();
    assert!(n > 10);
    assert_exact(&mut c, H);
    assert_no_resync(&mut c);
}

#[test]
fn replica_serves_while_rebuilding_after_full_sync() {
    let p = big_server();
    let r = Server::builder()
        .module_arg("step-budget-us", "200")
        .replica_of(&p)
        .start();
    wait_replica_sync(&p, &r);
    let mut pc = p.conn();
    let mut rc = r.conn();
    for i in 0..100 {
        ok(&mut pc, &["SET", &format!("after:{i}"), "1"]);
    }
    wait_replica_sync(&p, &r);
    assert_eq!(slots_info(&mut rc), slots_info(&mut pc));
    assert_exact(&mut rc, H);
}
