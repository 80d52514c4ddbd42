//! The cross-instance load lock: one instance loads a missing key while the others wait for
//! the shared tiers to fill. It saves work; it does not make anything correct, because a lease
//! can expire under a slow loader and a second instance then loads too.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::store::TierStore;

/// A lock this instance holds, kept alive by a task that extends its lease. Released by
/// [`release`](Self::release); if dropped instead (a panic), released in the background.
pub(crate) struct HeldLock {
    store: Arc<dyn TierStore>,
    key: String,
    token: u128,
    extender: JoinHandle<()>,
    released: bool,
}

impl HeldLock {
    /// Takes the lock of `key` if it is free.
    pub(crate) async fn try_take(
        store: &Arc<dyn TierStore>,
        key: &str,
        lease: Duration,
    ) -> crate::Result<Option<HeldLock>> {
        let token = crate::random::random_u128();
        if !store.try_lock(key, token, lease).await? {
            return Ok(None);
        }
        let extender = {
            let (store, key) = (store.clone(), key.to_owned());
            tokio::spawn(async move {
                // Extend at a third of the lease, so one slow round trip cannot lose it.
                let every = (lease / 3).max(Duration::from_millis(1));
                loop {
                    tokio::time::sleep(every).await;
                    match store.extend_lock(&key, token, lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(key = %crate::error::excerpt(&key), "load lock lost before the load finished; another instance may load too");
                            return;
                        }
                        // The store is failing; keep trying while the lease lasts.
                        Err(_) => {}
                    }
                }
            })
        };
        Ok(Some(HeldLock {
            store: store.clone(),
            key: key.to_owned(),
            token,
            extender,
            released: false,
        }))
    }

    /// Stops extending and releases the lock (if this instance still holds it).
    pub(crate) async fn release(mut self) {
        self.released = true;
        self.extender.abort();
        let _ = self.store.unlock(&self.key, self.token).await;
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.extender.abort();
        if !self.released {
            let (store, key, token) = (
                self.store.clone(),
                std::mem::take(&mut self.key),
                self.token,
            );
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = store.unlock(&key, token).await;
                });
            }
        }
    }
}

/// Pauses between polls of a waiter: doubling from `min` to `max`, each with up to half again
/// at random, so waiters on many instances do not poll in step.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min.max(Duration::from_millis(1)),
            max: max.max(min),
        }
    }

    pub(crate) fn pause(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = (crate::random::random_u128() % 1000) as u32;
        base + base.mul_f64(f64::from(jitter) / 2000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_and_backoff_doubles_up_to_its_bound() {
        assert_ne!(crate::random::random_u128(), crate::random::random_u128());
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
        let pauses: Vec<Duration> = (0..5).map(|_| backoff.pause()).collect();
        for (pause, base) in pauses.iter().zip([10, 20, 40, 40, 40]) {
            let base = Duration::from_millis(base);
            assert!(
                *pause >= base && *pause <= base.mul_f64(1.5),
                "{pause:?} vs {base:?}"
            );
        }
    }
}
