//! The flip moves the shared heap's page tables, kept aside since the
//! switch, back over the heap (DESIGN.md, fold-back point 9). Its own test
//! binary: it counts the process' mappings, which tests running in parallel
//! in the same process would change.

mod common;

use common::{engine, fork_checker, reap};
use std::time::Duration;

/// Whether the page at `addr` has a page-table entry (pagemap bit 63).
fn pte_present(addr: usize) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start((addr / 4096 * 8) as u64)).unwrap();
    let mut b = [0u8; 8];
    f.read_exact(&mut b).unwrap();
    u64::from_le_bytes(b) >> 63 == 1
}

#[test]
fn flip_moves_the_kept_shared_tables_back_and_they_show_the_fold() {
    let e = engine(256 << 20);
    let len = 8 << 20;
    let a = e.alloc(len, 4096).unwrap().as_ptr() as usize;
    // SAFETY: a is len bytes of region memory owned by this test.
    let s = unsafe { std::slice::from_raw_parts_mut(a as *mut u8, len) };
    s.fill(1);
    let mut maps_after = Vec::new();
    for cycle in 0..3u8 {
        let pid = fork_checker(&e, s, 1 + cycle * 4, 50);
        // During the snapshot: rewrite the first half (private copies the
        // fold must carry into the memfd pages the kept tables map), and
        // grow the heap (pages the kept tables never saw).
        s[..len / 2].fill(2 + cycle * 4);
        let g = e.alloc(1 << 20, 4096).unwrap().as_ptr();
        // SAFETY: 1 MiB the engine just handed out.
        unsafe { std::ptr::write_bytes(g, 3, 1 << 20) };
        assert_eq!(
            reap(pid),
            0,
            "cycle {cycle}: the child saw a wrong snapshot"
        );
        assert!(e.child_exited(pid));
        assert!(e.wait_idle(Duration::from_secs(10)));
        assert_eq!(e.stats().flips_with_kept_tables, cycle as u64 + 1);
        // Before anything reads the heap: the pages touched before the fork
        // are mapped already (a fresh mapping would have no entry).
        let mapped = (a..a + len)
            .step_by(4096)
            .filter(|&p| pte_present(p))
            .count();
        assert_eq!(
            mapped,
            len / 4096,
            "cycle {cycle}: pages mapped after the flip"
        );
        assert!(
            s[..len / 2].iter().all(|&x| x == 2 + cycle * 4),
            "cycle {cycle}: first half"
        );
        assert!(
            s[len / 2..].iter().all(|&x| x == 1 + cycle * 4),
            "cycle {cycle}: second half"
        );
        // SAFETY: the 1 MiB allocated above.
        assert!(unsafe { std::slice::from_raw_parts(g, 1 << 20) }
            .iter()
            .all(|&x| x == 3));
        // The moved-back heap is coherent with later file changes (a purge
        // punches a hole and must zap its entries) and is inherited by the
        // next child (the kept range was DONTFORK): the next cycle's child
        // reads all of it.
        assert!(e.purge(a + len / 2, 1 << 20));
        assert!(s[len / 2..len / 2 + (1 << 20)].iter().all(|&x| x == 0));
        s.fill(1 + (cycle + 1) * 4);
        // Every cycle leaves the same mappings behind once the old tables
        // are torn down: the kept ones are reused or unmapped, never leaked.
        let t = std::time::Instant::now();
        while e.teardown_pending() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        maps_after.push(mapping_count());
    }
    assert!(
        maps_after.windows(2).all(|w| w[1] <= w[0]),
        "mappings after each cycle: {maps_after:?}"
    );
}

fn mapping_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}
