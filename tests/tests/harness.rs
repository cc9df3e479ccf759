//! Self-tests of the harness, on a plain redis-server without the module, so a
//! harness problem is told apart from a module problem.

use slotfork_tests::*;

#[test]
fn plain_server_starts_restarts_and_replicates() {
    let mut s = Server::builder().without_module().start();
    let mut c = s.conn();
    ok(&mut c, &["SET", "a", "1"]);
    s.restart(Stop::ShutdownSave);
    let mut c = s.conn();
    assert_eq!(as_string(&ok(&mut c, &["GET", "a"])), "1");

    s.restart(Stop::Kill);
    let mut c = s.conn();
    assert_eq!(
        as_string(&ok(&mut c, &["GET", "a"])),
        "1",
        "RDB from the SHUTDOWN SAVE is still there"
    );

    let r = Server::builder().without_module().replica_of(&s).start();
    ok(&mut c, &["SET", "b", "2"]);
    wait_replica_sync(&s, &r);
    let mut rc = r.conn();
    assert_eq!(dbsize(&mut rc), 2);
    assert!(!s.log_tail(5).is_empty());
}

#[test]
fn plain_server_aof_restart() {
    let mut s = Server::builder().without_module().appendonly(true).start();
    let mut c = s.conn();
    ok(&mut c, &["SET", "a", "1"]);
    s.restart(Stop::ShutdownNoSave);
    let mut c = s.conn();
    assert_eq!(as_string(&ok(&mut c, &["GET", "a"])), "1");
}

#[test]
fn missing_module_fails_cleanly() {
    let r = Server::builder()
        .without_module()
        .config("loadmodule /nonexistent/libslots.so")
        .try_start();
    assert!(r.is_err());
}
