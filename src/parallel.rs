//! Both cores for the state-free half of the pipeline.
//!
//! Reading an envelope and normalizing its body (JSON parse, carrier mapping,
//! hashing) touches no state, so a batch's records can be prepared on several
//! threads; dedupe and ordering then run in input order on one thread, exactly as
//! before, so results do not depend on the thread count (tests pin this). The
//! threads are scoped to the call: nothing outlives a batch, nothing is shared
//! but the read-only pipeline.

/// Fewer records than this per thread are not worth a thread (spawning one costs
/// tens of microseconds; preparing a record costs about as much).
pub const MIN_RECORDS_PER_THREAD: usize = 16;

/// The number of threads `0` ("one per core") stands for on this machine.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `f` applied to every item, on up to `threads` threads (contiguous chunks, the
/// calling thread takes the first), results in input order. A panic in `f`
/// propagates to the caller as it would without threads.
pub fn map_ordered<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.min(items.len() / MIN_RECORDS_PER_THREAD).max(1);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let mut chunks = items.chunks(chunk);
        let first = chunks.next().unwrap_or_default();
        let others: Vec<_> = chunks.map(|c| scope.spawn(move || c.iter().map(f).collect::<Vec<R>>())).collect();
        let mut out: Vec<R> = Vec::with_capacity(items.len());
        out.extend(first.iter().map(f));
        for handle in others {
            match handle.join() {
                Ok(results) => out.extend(results),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// Records per chunk of [`prepare_and_apply`]: small enough that applying can
/// start soon after a batch begins, large enough that handing a chunk over costs
/// little next to preparing it.
pub const CHUNK_RECORDS: usize = 32;

/// Prepare every item (`prepare`, on up to `threads` threads) and apply each
/// result on the calling thread, in input order, while later items are still
/// being prepared: the calling thread applies chunk `i` as soon as it is ready
/// and, while it is not, prepares the next unclaimed chunk itself rather than
/// wait. So applying (the sequential half: dedupe and ordering) overlaps the
/// preparing of the rest of the batch instead of following all of it, and the
/// applied sequence is the same whatever the thread count. An `Err` from `apply`
/// stops the batch (helpers finish the chunk in hand and claim no more); a
/// panic in `prepare` reaches the caller.
pub fn prepare_and_apply<T: Sync, R: Send, E>(
    items: &[T],
    threads: usize,
    prepare: impl Fn(&T) -> R + Sync,
    mut apply: impl FnMut(usize, R) -> Result<(), E>,
) -> Result<(), E> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

    let helpers = threads.min(items.len() / MIN_RECORDS_PER_THREAD).max(1) - 1;
    if helpers == 0 {
        for (i, item) in items.iter().enumerate() {
            apply(i, prepare(item))?;
        }
        return Ok(());
    }
    let chunks = items.len().div_ceil(CHUNK_RECORDS);
    let prepare = &prepare;
    let prepare_chunk = |j: usize| -> Vec<R> { items[j * CHUNK_RECORDS..((j + 1) * CHUNK_RECORDS).min(items.len())].iter().map(prepare).collect() };
    /// Prepared chunks not yet applied, and how many helpers still run.
    struct Shared<R> {
        slots: Vec<Option<Vec<R>>>,
        helpers_running: usize,
    }
    let shared = Mutex::new(Shared { slots: (0..chunks).map(|_| None).collect(), helpers_running: helpers });
    let lock = || -> MutexGuard<'_, Shared<R>> { shared.lock().unwrap_or_else(PoisonError::into_inner) };
    let ready = Condvar::new();
    let next_claim = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let claim = || Some(next_claim.fetch_add(1, Ordering::Relaxed)).filter(|j| *j < chunks);

    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..helpers)
            .map(|_| {
                scope.spawn(|| {
                    /// Counts the helper out however it ends (a panic included),
                    /// so the caller never waits for a chunk nobody prepares.
                    struct Exit<'a, F: Fn()>(&'a F);
                    impl<F: Fn()> Drop for Exit<'_, F> {
                        fn drop(&mut self) {
                            (self.0)();
                        }
                    }
                    let leave = || {
                        lock().helpers_running -= 1;
                        ready.notify_all();
                    };
                    let _exit = Exit(&leave);
                    while !stop.load(Ordering::Relaxed) {
                        let Some(j) = claim() else { break };
                        let done = prepare_chunk(j);
                        lock().slots[j] = Some(done);
                        ready.notify_all();
                    }
                })
            })
            .collect();
        let mut applied = || -> Option<Result<(), E>> {
            for i in 0..chunks {
                let prepared = loop {
                    if let Some(done) = lock().slots[i].take() {
                        break done;
                    }
                    // Not ready: prepare the next unclaimed chunk here.
                    if let Some(j) = claim() {
                        let done = prepare_chunk(j);
                        if j == i {
                            break done;
                        }
                        lock().slots[j] = Some(done);
                        continue;
                    }
                    // Every chunk is claimed: wait for the helper preparing chunk i.
                    let mut guard = lock();
                    while guard.slots[i].is_none() && guard.helpers_running > 0 {
                        guard = ready.wait(guard).unwrap_or_else(PoisonError::into_inner);
                    }
                    match guard.slots[i].take() {
                        Some(done) => break done,
                        // Its helper died (a panic): re-raised below.
                        None => return None,
                    }
                };
                for (k, result) in prepared.into_iter().enumerate() {
                    if let Err(e) = apply(i * CHUNK_RECORDS + k, result) {
                        return Some(Err(e));
                    }
                }
            }
            Some(Ok(()))
        };
        let outcome = applied();
        stop.store(true, Ordering::Relaxed);
        for handle in handles {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        match outcome {
            Some(result) => result,
            None => unreachable!("a helper stopped without its chunk, so it panicked, and its join re-raised the panic"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_items_are_applied_in_input_order_whatever_the_thread_count() {
        let items: Vec<u64> = (0..1000).collect();
        for threads in [0, 1, 2, 3, 7, 64] {
            let mut seen = Vec::new();
            let result: Result<(), ()> = prepare_and_apply(&items, threads, |n| n * n, |i, square| {
                seen.push((i, square));
                Ok(())
            });
            assert!(result.is_ok());
            assert_eq!(seen, items.iter().map(|n| (*n as usize, n * n)).collect::<Vec<_>>(), "{threads} threads");
        }
        let result: Result<(), ()> = prepare_and_apply(&[] as &[u64], 4, |n| *n, |_, _| panic!("nothing to apply"));
        assert!(result.is_ok());
    }

    #[test]
    fn applying_starts_before_the_whole_batch_is_prepared() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let items: Vec<u64> = (0..(CHUNK_RECORDS * 40) as u64).collect();
        let prepared = AtomicUsize::new(0);
        let mut prepared_when_first_applied = None;
        let result: Result<(), ()> = prepare_and_apply(
            &items,
            2,
            |n| {
                prepared.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_micros(200));
                *n
            },
            |_, _| {
                prepared_when_first_applied.get_or_insert(prepared.load(Ordering::SeqCst));
                Ok(())
            },
        );
        assert!(result.is_ok());
        let first = prepared_when_first_applied.unwrap();
        assert!(first < items.len() / 2, "the first record was applied only after {first} of {} were prepared", items.len());
    }

    #[test]
    fn an_apply_error_stops_the_batch_and_a_panic_reaches_the_caller() {
        let items: Vec<u32> = (0..1000).collect();
        let mut applied = 0;
        let result = prepare_and_apply(&items, 2, |n| *n, |i, _| {
            applied += 1;
            if i == 100 { Err("stop here") } else { Ok(()) }
        });
        assert_eq!((result, applied), (Err("stop here"), 101));
        for panic_at in [5, 500, 999] {
            let outcome = std::panic::catch_unwind(|| {
                prepare_and_apply(&items, 2, |n| assert!(*n != panic_at, "boom"), |_, ()| Ok::<(), ()>(()))
            });
            assert!(outcome.is_err(), "a panic at {panic_at} must reach the caller");
        }
    }

    #[test]
    fn results_keep_input_order_whatever_the_thread_count() {
        let items: Vec<u64> = (0..1000).collect();
        let expected: Vec<u64> = items.iter().map(|n| n * n).collect();
        for threads in [0, 1, 2, 3, 7, 64, 1000] {
            assert_eq!(map_ordered(&items, threads, |n| n * n), expected, "{threads} threads");
        }
        assert!(map_ordered(&[] as &[u64], 4, |n| *n).is_empty());
    }

    #[test]
    fn small_batches_stay_on_the_calling_thread() {
        let caller = std::thread::current().id();
        let items = vec![(); MIN_RECORDS_PER_THREAD * 2 - 1];
        assert!(map_ordered(&items, 8, |_| std::thread::current().id()).iter().all(|id| *id == caller));
        let items = vec![(); MIN_RECORDS_PER_THREAD * 4];
        let ids = map_ordered(&items, 2, |_| std::thread::current().id());
        assert_eq!(ids[0], caller);
        assert_ne!(ids[ids.len() - 1], caller, "the second half ran on another thread");
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let items: Vec<u32> = (0..100).collect();
        let outcome = std::panic::catch_unwind(|| map_ordered(&items, 2, |n| assert!(*n != 90, "boom")));
        assert!(outcome.is_err());
    }
}
