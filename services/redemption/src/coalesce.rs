//! Look-ups that many concurrent redemptions share: concurrent requests for
//! the same key wait on one call, and a result may be kept for a short time
//! (zero keeps nothing: only calls already in flight are shared, so nothing
//! read is older than the call that read it).
//!
//! Hand-written rather than `moka`: what is kept is decided per answer (an
//! event key's for a second, a class's never: only the call in flight is
//! shared), errors are shared by the callers waiting but never kept, and the
//! whole of it is one small map; `moka` would add a large dependency to the
//! build for a cache that mostly holds nothing.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

use crate::error::Error;

type Pending<V> = Shared<BoxFuture<'static, Result<V, Error>>>;

enum Entry<V> {
    /// A call in flight that later callers join, and the value kept before
    /// it (still what [`Coalesce::kept`] reads until the call ends).
    Pending(Pending<V>, Option<(V, Instant)>),
    /// A result kept until the instant.
    Ready(V, Instant),
}

/// A coalescing, briefly caching map of look-ups.
pub struct Coalesce<K, V> {
    keep: Duration,
    /// Whether [`get`](Self::get) answers from a kept value (false: kept
    /// values serve [`kept`](Self::kept) alone, and `get` always calls).
    serve_kept: bool,
    entries: Arc<Mutex<HashMap<K, Entry<V>>>>,
}

impl<K, V> Coalesce<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Results are kept for `keep` (zero: only in-flight calls are shared).
    pub fn new(keep: Duration) -> Self {
        Self {
            keep,
            serve_kept: true,
            entries: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Results are kept for `keep` for [`kept`](Self::kept) to read, but
    /// [`get`](Self::get) always calls (sharing only calls in flight).
    pub fn kept_for_peeks(keep: Duration) -> Self {
        Self {
            serve_kept: false,
            ..Self::new(keep)
        }
    }

    /// The value kept for `key`, if any and still within its time.
    pub fn kept(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match entries.get(key) {
            Some(Entry::Ready(value, until) | Entry::Pending(_, Some((value, until))))
                if Instant::now() < *until =>
            {
                Some(value.clone())
            }
            _ => None,
        }
    }

    /// The value for `key`: kept, joined, or fetched by `fetch`. `keep_it`
    /// says whether a fetched value may be kept (errors never are). The
    /// bookkeeping runs inside the shared call, so it happens even if the
    /// caller that started it goes away.
    pub async fn get<F, P>(&self, key: K, fetch: F, keep_it: P) -> Result<V, Error>
    where
        F: Future<Output = Result<V, Error>> + Send + 'static,
        P: Fn(&V) -> bool + Send + 'static,
    {
        let pending = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            match entries.get(&key) {
                Some(Entry::Ready(value, until)) if self.serve_kept && Instant::now() < *until => {
                    return Ok(value.clone());
                }
                Some(Entry::Pending(pending, _)) => pending.clone(),
                previous => {
                    let last = match previous {
                        Some(Entry::Ready(value, until)) => Some((value.clone(), *until)),
                        _ => None,
                    };
                    let (map, keep, k) = (self.entries.clone(), self.keep, key.clone());
                    let pending = async move {
                        let result = fetch.await;
                        let mut entries = map.lock().unwrap_or_else(PoisonError::into_inner);
                        match &result {
                            Ok(value) if !keep.is_zero() && keep_it(value) => {
                                entries
                                    .insert(k, Entry::Ready(value.clone(), Instant::now() + keep));
                            }
                            _ => {
                                entries.remove(&k);
                            }
                        }
                        // Expired entries go when the map grows: it holds hot keys only.
                        if entries.len() > 10_000 {
                            let now = Instant::now();
                            entries.retain(|_, e| match e {
                                Entry::Pending(..) => true,
                                Entry::Ready(_, until) => *until > now,
                            });
                        }
                        result
                    }
                    .boxed()
                    .shared();
                    entries.insert(key, Entry::Pending(pending.clone(), last));
                    pending
                }
            }
        };
        pending.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_lookups_share_one_call_and_errors_are_not_kept() {
        let cache: Arc<Coalesce<u32, u32>> = Arc::new(Coalesce::new(Duration::ZERO));
        let calls = Arc::new(AtomicUsize::new(0));
        let lookups = (0..50).map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                let fetch = async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(7)
                };
                cache.get(1, fetch, |_| true).await
            })
        });
        for l in futures::future::join_all(lookups).await {
            assert_eq!(l.unwrap().unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Nothing kept with a zero keep: the next look-up calls again.
        let again = cache.get(1, async { Ok(8) }, |_| true).await.unwrap();
        assert_eq!(again, 8);
        assert!(
            cache
                .get(2, async { Err(Error::KeyNotFound) }, |_| true)
                .await
                .is_err()
        );
        assert_eq!(cache.get(2, async { Ok(3) }, |_| true).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn kept_values_expire() {
        let cache: Coalesce<u32, u32> = Coalesce::new(Duration::from_millis(30));
        assert_eq!(cache.get(1, async { Ok(1) }, |_| true).await.unwrap(), 1);
        assert_eq!(cache.get(1, async { Ok(2) }, |_| true).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(cache.get(1, async { Ok(3) }, |_| true).await.unwrap(), 3);
        // A value `keep_it` refuses is not kept.
        assert_eq!(cache.get(9, async { Ok(0) }, |v| *v > 0).await.unwrap(), 0);
        assert_eq!(cache.kept(&9), None);
        assert_eq!(cache.get(9, async { Ok(5) }, |v| *v > 0).await.unwrap(), 5);
        assert_eq!(cache.kept(&9), Some(5));
    }

    #[tokio::test]
    async fn values_kept_for_peeks_are_not_served_by_get() {
        let cache: Coalesce<u32, u32> = Coalesce::kept_for_peeks(Duration::from_millis(30));
        assert_eq!(cache.get(1, async { Ok(1) }, |_| true).await.unwrap(), 1);
        assert_eq!(cache.kept(&1), Some(1));
        assert_eq!(cache.get(1, async { Ok(2) }, |_| true).await.unwrap(), 2);
        assert_eq!(cache.kept(&1), Some(2));
        // While a look-up is in flight, the value kept before it still reads.
        let slow = cache.get(
            1,
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(3)
            },
            |_| true,
        );
        let peek = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            cache.kept(&1)
        };
        let (fetched, peeked) = tokio::join!(slow, peek);
        assert_eq!((fetched.unwrap(), peeked), (3, Some(2)));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(cache.kept(&1), None);
    }
}
