//! Local single-flight: at most one load per key at a time in this process. Concurrent callers
//! of a cold key join the load in flight and all get its outcome, value or error. The load runs
//! in its own task, so a caller that gives up (its future dropped) cancels nothing.
//!
//! A flight also carries a stale fallback as soon as the leader finds one, so that a caller
//! with a soft timeout can be served it while the load goes on.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::BoxError;

/// Why a shared load produced no value.
#[derive(Debug)]
pub(crate) enum LoadFailure {
    /// The loader returned this error.
    Failed(BoxError),
    /// The loader ran past the hard timeout.
    TimedOut(Duration),
    /// The loader's task ended without an outcome: it panicked or its runtime shut down.
    Abandoned,
    /// A batch loader did not return this key (it does not exist upstream).
    NotReturned,
}

impl fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadFailure::Failed(error) => fmt::Display::fmt(error, f),
            LoadFailure::TimedOut(after) => write!(
                f,
                "the loader took longer than the hard timeout of {after:?}"
            ),
            LoadFailure::Abandoned => f.write_str("the loader panicked or its task was cancelled"),
            LoadFailure::NotReturned => {
                f.write_str("the batch loader returned no value for this key")
            }
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
            LoadFailure::TimedOut(_) | LoadFailure::Abandoned | LoadFailure::NotReturned => None,
        }
    }
}

/// A value handed to callers, and whether it is a stale fallback.
#[derive(Debug)]
pub(crate) struct Served<V> {
    pub(crate) value: Arc<V>,
    pub(crate) stale: bool,
}

impl<V> Clone for Served<V> {
    fn clone(&self) -> Self {
        Served {
            value: self.value.clone(),
            stale: self.stale,
        }
    }
}

/// What a load ends with.
pub(crate) type Outcome<V> = Result<Served<V>, SharedLoadFailure>;

/// What a flight has to offer so far.
struct FlightState<V> {
    stale: Option<Arc<V>>,
    outcome: Option<Outcome<V>>,
}

type Slot<V> = watch::Receiver<FlightState<V>>;

/// The loads in flight, by key.
pub(crate) struct Flights<V> {
    in_flight: Mutex<HashMap<String, Slot<V>>>,
}

/// How a caller takes part in a key's load.
pub(crate) enum Join<V: Send + Sync + 'static> {
    /// No load was in flight: this caller starts one and must finish it through the guard.
    Lead(FlightGuard<V>),
    /// A load is in flight: wait for its outcome.
    Follow(Waiter<V>),
}

/// A caller's handle on a flight.
pub(crate) struct Waiter<V> {
    slot: Slot<V>,
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
            return Join::Follow(Waiter { slot: slot.clone() });
        }
        let (sender, receiver) = watch::channel(FlightState {
            stale: None,
            outcome: None,
        });
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
    sender: watch::Sender<FlightState<V>>,
}

impl<V: Send + Sync + 'static> FlightGuard<V> {
    /// A waiter for the leader itself.
    pub(crate) fn waiter(&self) -> Waiter<V> {
        Waiter {
            slot: self.sender.subscribe(),
        }
    }

    /// Offers a stale value that callers with a soft timeout may be served meanwhile.
    pub(crate) fn offer_stale(&self, value: Arc<V>) {
        self.sender.send_modify(|state| state.stale = Some(value));
    }

    /// Publishes the outcome to every waiter. The key stays in flight until the guard drops,
    /// so callers arriving meanwhile (while the value is being cached) get it too.
    pub(crate) fn publish(&self, outcome: Outcome<V>) {
        self.sender
            .send_modify(|state| state.outcome = Some(outcome));
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

impl<V> Waiter<V> {
    /// Waits for the outcome. With a soft timeout, once it has passed, a stale value (the
    /// caller's own, or one the leader offered) is served instead of waiting on.
    pub(crate) async fn wait(
        mut self,
        soft_timeout: Option<Duration>,
        own_stale: Option<Arc<V>>,
    ) -> Outcome<V> {
        let deadline = soft_timeout.map(|soft| tokio::time::Instant::now() + soft);
        loop {
            {
                let state = self.slot.borrow_and_update();
                if let Some(outcome) = &state.outcome {
                    return outcome.clone();
                }
                // Past the soft timeout: serve a stale value if there is one; if not yet, wait
                // on, and serve one if it is offered.
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
                    && let Some(value) = own_stale.clone().or_else(|| state.stale.clone())
                {
                    return Ok(Served { value, stale: true });
                }
            }
            let changed = match deadline {
                Some(d) if tokio::time::Instant::now() < d => {
                    tokio::select! {
                        changed = self.slot.changed() => changed,
                        _ = tokio::time::sleep_until(d) => Ok(()),
                    }
                }
                // No soft timeout, or past it with nothing stale yet: wait for a change (an
                // outcome, or a stale value offered).
                _ => self.slot.changed().await,
            };
            if changed.is_err() {
                // The leader is gone; it may still have published just before.
                let state = self.slot.borrow();
                return state
                    .outcome
                    .clone()
                    .unwrap_or_else(|| Err(SharedLoadFailure(Arc::new(LoadFailure::Abandoned))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(n: u32) -> Outcome<u32> {
        Ok(Served {
            value: Arc::new(n),
            stale: false,
        })
    }

    #[tokio::test]
    async fn followers_get_the_leaders_outcome_and_the_key_is_freed() {
        let flights: Arc<Flights<u32>> = Flights::new();
        let Join::Lead(guard) = flights.join("k") else {
            panic!("the first caller leads");
        };
        let Join::Follow(follower) = flights.join("k") else {
            panic!("the second caller follows");
        };
        let leader = guard.waiter();
        guard.publish(fresh(7));
        assert_eq!(*leader.wait(None, None).await.unwrap().value, 7);
        assert_eq!(*follower.wait(None, None).await.unwrap().value, 7);
        let Join::Follow(late) = flights.join("k") else {
            panic!("still in flight until the guard drops");
        };
        assert_eq!(*late.wait(None, None).await.unwrap().value, 7);
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
        let failure = follower.wait(None, None).await.unwrap_err();
        assert!(matches!(*failure.0, LoadFailure::Abandoned));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_soft_timeout_serves_a_stale_value_while_the_load_goes_on() {
        let flights: Arc<Flights<u32>> = Flights::new();
        let Join::Lead(guard) = flights.join("k") else {
            panic!("leads");
        };
        let Join::Follow(with_own) = flights.join("k") else {
            panic!("follows");
        };
        let Join::Follow(without) = flights.join("k") else {
            panic!("follows");
        };
        let soft = Some(Duration::from_millis(50));
        let own = tokio::spawn(with_own.wait(soft, Some(Arc::new(1))));
        let offered = tokio::spawn(without.wait(soft, None));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let served = own.await.unwrap().unwrap();
        assert_eq!((*served.value, served.stale), (1, true));
        // No stale value of its own: it waits until the leader offers one.
        assert!(!offered.is_finished());
        guard.offer_stale(Arc::new(2));
        let served = offered.await.unwrap().unwrap();
        assert_eq!((*served.value, served.stale), (2, true));
        guard.publish(fresh(3));
    }
}
