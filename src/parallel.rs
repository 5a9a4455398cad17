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

#[cfg(test)]
mod tests {
    use super::*;

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
