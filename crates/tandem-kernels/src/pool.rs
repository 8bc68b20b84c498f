//! Where the CPU kernels' parallel sections start from.
//!
//! Every product and row pass splits its work with rayon. Called from a thread outside rayon's
//! pool (`tandem finetune`'s main thread), each split is injected into the
//! pool: it wakes the workers and parks the caller until they are done, a round trip through
//! the kernel per section, hundreds per training step. Called from a worker, the worker runs
//! one part itself and the rest is stolen by a peer. `on_worker` moves a whole step onto a
//! worker once and keeps the peers polling while it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Runs `f` on rayon's worker 0 while the caller waits (at once if the caller is a worker),
/// and keeps the other workers polling for its parallel sections until it returns instead of
/// letting them fall asleep. Rayon parks an idle worker after a few dozen empty polls, so every
/// serial stretch of a training step (an allocation, a residual add, a softmax row) put the
/// peer to sleep and the next product paid a wake-up through the kernel; OpenMP runtimes (what
/// PyTorch's CPU kernels run on) spin for the same reason. The polling workers run any rayon
/// work there is (`rayon::yield_now`), so nothing waits on them, and they stop when `f` does.
/// Always worker 0: a step's buffers then come from one malloc arena (a step that moved between
/// workers grew each worker's arena to a step's working set: peak RSS up to 1.4x).
///
/// Only for CPU work (a GPU context is bound to the thread that made it), and only for work
/// that never waits on another thread: with one rayon thread, a worker blocked on a thread that
/// itself needs the pool (the engine's grammar masks are prepared that way) would wait forever,
/// which is why the engine's iterations do not use it.
///
/// Measured on 2 cores (`tandem finetune`, docs/benchmarks.md): on a worker 4-10% more trained
/// tokens/s than from the main thread, with the peers kept polling another 5%.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let done = AtomicBool::new(false);
    let job = Mutex::new(Some(f));
    let mut out = rayon::broadcast(|ctx| {
        if ctx.index() != 0 {
            keep_awake(&done);
            return None;
        }
        let f = job.lock().ok().and_then(|mut j| j.take());
        let r = f.map(|f| f());
        done.store(true, Ordering::Release);
        r
    });
    match out.first_mut().and_then(Option::take) {
        Some(r) => r,
        None => unreachable!("rayon's broadcast runs its closure on worker 0"),
    }
}

/// Until `done`: runs whatever the pool has to run, and in between polls instead of sleeping.
fn keep_awake(done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_on_a_worker_and_returns_its_value() {
        assert_eq!(rayon::current_thread_index(), None);
        let (index, sum) =
            super::on_worker(|| (rayon::current_thread_index(), (0..10u32).sum::<u32>()));
        assert!(index.is_some(), "ran on the calling thread");
        assert_eq!(sum, 45);
        // Nested: already on a worker, it runs in place.
        let inner = super::on_worker(|| {
            let me = rayon::current_thread_index();
            super::on_worker(move || rayon::current_thread_index() == me)
        });
        assert!(inner);
    }

    #[test]
    fn parallel_work_inside_and_concurrent_callers_finish() {
        use rayon::prelude::*;
        // Several threads outside the pool each run a step with parallel sections; each gets
        // its own sum back (the polling workers run the sections and stop when the steps do).
        let sums: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    s.spawn(move || {
                        super::on_worker(|| {
                            (0..50)
                                .map(|_| (0..10_000u64).into_par_iter().map(|v| v * t).sum::<u64>())
                                .sum()
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        let one: u64 = (0..10_000u64).sum::<u64>() * 50;
        assert_eq!(sums, vec![0, one, 2 * one, 3 * one]);
    }
}
