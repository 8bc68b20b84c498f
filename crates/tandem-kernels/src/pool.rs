//! Where the CPU kernels' parallel sections start from.
//!
//! Every product and row pass splits its work with rayon. Called from a thread outside rayon's
//! pool (`tandem finetune`'s main thread), each split is injected into the
//! pool: it wakes the workers and parks the caller until they are done, a round trip through
//! the kernel per section, hundreds per training step. Called from a worker, the worker runs
//! one part itself and the rest is stolen by a peer. `on_worker` moves a whole step onto a
//! worker once.

/// Runs `f` on one of rayon's worker threads while the caller waits (at once if the caller is
/// one). Only for CPU work (a GPU context is bound to the thread that made it), and only for
/// work that never waits on another thread: with one rayon thread, a worker blocked on a thread
/// that itself needs the pool (the engine's grammar masks are prepared that way) would wait
/// forever, which is why the engine's iterations do not use it.
///
/// Measured on 2 cores (`tandem finetune`, docs/benchmarks.md): 4-10% more trained tokens/s.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::join(f, || ()).0
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
}
