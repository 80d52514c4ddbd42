//! Local single-flight: at most one load per key at a time in this process. Concurrent callers
//! of a cold key join the load in flight and all get its outcome, value or error. The load runs
//! in its own task, so a caller that gives up (its future dropped) cancels nothing.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::BoxError;

/// Why a shared load produced no value.
#[derive(Debug)]
pub(crate) enum LoadFailure {
    /// The loader returned this error.
    Failed(BoxError),
    /// The loader's task ended without an outcome: it panicked or its runtime shut down.
    Abandoned,
}

impl fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadFailure::Failed(error) => fmt::Display::fmt(error, f),
            LoadFailure::Abandoned => f.write_str("the loader panicked or its task was cancelled"),
        }
    }
}

/// A load failure shared by every caller that waited on it; its `source` is the loader's.
#[derive(Debug, Clone)]
pub(crate) struct SharedLoadFailure(pub(crate) Arc<LoadFailure>);

impl fmt::Display for SharedLoadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SharedLoadFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &*self.0 {
            LoadFailure::Failed(error) => error.source(),
            LoadFailure::Abandoned => None,
        }
    }
}

/// What a load ends with.
pub(crate) type Outcome<V> = Result<Arc<V>, SharedLoadFailure>;

type Slot<V> = watch::Receiver<Option<Outcome<V>>>;

/// The loads in flight, by key.
pub(crate) struct Flights<V> {
    in_flight: Mutex<HashMap<String, Slot<V>>>,
}

/// How a caller takes part in a key's load.
pub(crate) enum Join<V: Send + Sync + 'static> {
    /// No load was in flight: this caller starts one and must finish it through the guard.
    Lead(FlightGuard<V>),
    /// A load is in flight: wait for its outcome.
    Follow(Slot<V>),
}

impl<V: Send + Sync + 'static> Flights<V> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Flights {
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// Joins the load of `key` in flight, or leads a new one.
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Join<V> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = in_flight.get(key) {
            return Join::Follow(slot.clone());
        }
        let (sender, receiver) = watch::channel(None);
        in_flight.insert(key.to_owned(), receiver);
        Join::Lead(FlightGuard {
            flights: self.clone(),
            key: key.to_owned(),
            sender,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// The leader's duty: publish the outcome. Dropped without one (a panic, an aborted task), the
/// waiters learn that the load was abandoned. Either way the key leaves the map, so the next
/// caller starts afresh.
pub(crate) struct FlightGuard<V: Send + Sync + 'static> {
    flights: Arc<Flights<V>>,
    key: String,
    sender: watch::Sender<Option<Outcome<V>>>,
}

impl<V: Send + Sync + 'static> FlightGuard<V> {
    /// A receiver for the leader itself.
    pub(crate) fn subscribe(&self) -> Slot<V> {
        self.sender.subscribe()
    }

    /// Publishes the outcome to every waiter. The key stays in flight until the guard drops,
    /// so callers arriving meanwhile (while the value is being cached) get it too.
    pub(crate) fn publish(&self, outcome: Outcome<V>) {
        self.sender.send_replace(Some(outcome));
    }
}

impl<V: Send + Sync + 'static> Drop for FlightGuard<V> {
    fn drop(&mut self) {
        let mut in_flight = self
            .flights
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if in_flight
            .get(&self.key)
            .is_some_and(|slot| slot.same_channel(&self.sender.subscribe()))
        {
            in_flight.remove(&self.key);
        }
    }
}

/// Waits for the outcome of a load.
pub(crate) async fn wait<V>(mut slot: Slot<V>) -> Outcome<V> {
    loop {
        if let Some(outcome) = slot.borrow_and_update().clone() {
            return outcome;
        }
        if slot.changed().await.is_err() {
            // The leader is gone; it may still have published just before.
            return slot
                .borrow()
                .clone()
                .unwrap_or_else(|| Err(SharedLoadFailure(Arc::new(LoadFailure::Abandoned))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_outcome_and_the_key_is_freed() {
        let flights: Arc<Flights<u32>> = Flights::new();
        let Join::Lead(guard) = flights.join("k") else {
            panic!("the first caller leads");
        };
        let Join::Follow(follower) = flights.join("k") else {
            panic!("the second caller follows");
        };
        let leader = guard.subscribe();
        guard.publish(Ok(Arc::new(7)));
        assert_eq!(*wait(leader).await.unwrap(), 7);
        assert_eq!(*wait(follower).await.unwrap(), 7);
        let Join::Follow(late) = flights.join("k") else {
            panic!("still in flight until the guard drops");
        };
        assert_eq!(*wait(late).await.unwrap(), 7);
        drop(guard);
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join("k"), Join::Lead(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_abandons_the_load_for_its_followers() {
        let flights: Arc<Flights<u32>> = Flights::new();
        let Join::Lead(guard) = flights.join("k") else {
            panic!("leads");
        };
        let Join::Follow(follower) = flights.join("k") else {
            panic!("follows");
        };
        drop(guard);
        let failure = wait(follower).await.unwrap_err();
        assert!(matches!(*failure.0, LoadFailure::Abandoned));
        assert_eq!(flights.len(), 0);
    }
}
