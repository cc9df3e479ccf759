//! Fork stall of the parent: stock fork() of a 4 KiB-page heap, of a
//! THP-backed heap, and the async engine, at 1, 2, 4, 8 GiB (sizes the
//! machine cannot hold comfortably are skipped).
//!
//! cargo bench -p forkpatch-bench --bench fork_stall

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use forkpatch_bench::{sizes_that_fit, stock_fork_stall, AnonHeap, EngineHeap, GIB};
use std::time::Duration;

fn fork_stall(c: &mut Criterion) {
    let sizes = sizes_that_fit(&[1, 2, 4, 8]);
    let mut g = c.benchmark_group("fork_stall");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    // What fork() costs in this process without any heap: the floor under
    // every number below.
    g.bench_function("stock_no_heap", |b| {
        b.iter_custom(|n| (0..n).map(|_| stock_fork_stall()).sum())
    });
    for &gib in &sizes {
        {
            let _heap = AnonHeap::new(gib * GIB, false);
            g.bench_with_input(BenchmarkId::new("stock_4k", gib), &gib, |b, _| {
                b.iter_custom(|n| (0..n).map(|_| stock_fork_stall()).sum())
            });
        }
        {
            let _heap = AnonHeap::new(gib * GIB, true);
            g.bench_with_input(BenchmarkId::new("stock_thp", gib), &gib, |b, _| {
                b.iter_custom(|n| (0..n).map(|_| stock_fork_stall()).sum())
            });
        }
        match EngineHeap::new(gib * GIB) {
            Ok(h) => {
                g.bench_with_input(BenchmarkId::new("async_engine", gib), &gib, |b, _| {
                    b.iter_custom(|n| (0..n).map(|_| h.fork_stall()).sum())
                });
            }
            Err(d) => eprintln!("async engine unavailable: {d}"),
        }
    }
    g.finish();
}

criterion_group!(benches, fork_stall);
criterion_main!(benches);
