//! [`ProbeQueue`]: coalesces concurrent probes of the shared tiers. While the limit of probes
//! is out, further probes wait; when one comes back, the first waiter takes the waiting reads
//! (up to [`MAX_BATCH_KEYS`] keys) and probes them together: one `MGET` when every key was
//! read before. Below the limit a probe goes out at once, so a lone read waits for nothing.
//!
//! The limit adapts between [`SATURATED_LIMIT`] (or `max_in_flight`, if lower) and
//! `max_in_flight` (when that is not 0). When [`SATURATED_QUEUE_READS`] or more reads queued
//! behind a batch's leader, reads arrive faster than round trips return: the limit drops to two
//! batches out, so that Redis answers one while this process handles the other's reply, and
//! the reads in between form the next. Few, large batches cost Redis and the connection the
//! fewest commands. Probes returning over the limit while a batch is out are then freed; one
//! returning within the limit, or while no batch is out, leads the waiting reads, so waiters
//! never wait for the slowest probe. Each leader that finds fewer queued, or leaves some
//! behind at the batch's key cap, doubles the limit back, so that a moderate load returns to
//! reads out side by side. With one key per read on this machine, 64 tasks reading at once
//! then cost a few commands a round trip, and 16 tasks, once the limit has widened, do not
//! wait on each other's batches.
//!
//! A waiter that is handed the lead holds a [`Slot`]; a slot that is dropped unused (its
//! holder was cancelled) passes itself on, so cancelled readers can neither strand the
//! waiters nor leak a slot. A waiter whose batch's leader was cancelled queues again, at the
//! front.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::store::Probe;
use crate::error::Result;

/// Most keys one coalesced probe carries; later waiters go in the next one.
const MAX_BATCH_KEYS: usize = 1000;

/// Reads queued behind a batch's leader that mean the cache is saturated (see the module
/// docs): from this many, the limit drops to [`SATURATED_LIMIT`].
const SATURATED_QUEUE_READS: usize = 16;

/// The limit under saturation: two batches out, one at Redis while the other's reply is
/// handled here (parsed, and each read handed its answer). With one batch at a time, each side
/// sat idle while the other worked.
const SATURATED_LIMIT: usize = 2;

/// The probes of one store that are out, and the reads waiting for a turn.
pub(crate) struct ProbeQueue {
    shared: Arc<Shared>,
}

struct Shared {
    max_in_flight: usize,
    state: Mutex<State>,
}

struct State {
    in_flight: usize,
    /// The current limit, between `SATURATED_LIMIT` (or `max_in_flight`, if lower) and
    /// `max_in_flight`.
    limit: usize,
    /// Slots handed to a waiter as the lead of a batch, not yet dropped.
    leading: usize,
    waiting: VecDeque<Waiter>,
}

/// A read waiting for a turn: its keys, and where its answer goes.
pub(crate) struct Waiter {
    keys: Keys,
    reply: oneshot::Sender<Turn>,
}

/// A waiter's own copy of its keys, in one buffer: one allocation for a read of one key (the
/// common case), two for a batch.
struct Keys {
    /// The keys, one after another.
    text: String,
    /// Where each key but the last ends in `text`; empty for one key.
    ends: Vec<usize>,
    /// How many keys there are (`ends.len() + 1`, or 0).
    count: usize,
}

impl Keys {
    fn copy(keys: &[&str]) -> Self {
        let mut text = String::with_capacity(keys.iter().map(|k| k.len()).sum());
        let mut ends = Vec::with_capacity(keys.len().saturating_sub(1));
        for (i, key) in keys.iter().enumerate() {
            if i > 0 {
                ends.push(text.len());
            }
            text.push_str(key);
        }
        Keys {
            text,
            ends,
            count: keys.len(),
        }
    }

    fn len(&self) -> usize {
        self.count
    }

    fn iter(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        let ends = self
            .ends
            .iter()
            .copied()
            .chain(std::iter::once(self.text.len()));
        starts
            .zip(ends)
            .take(self.count)
            .map(|(start, end)| &self.text[start..end])
    }
}

/// What a waiting read is told.
pub(crate) enum Turn {
    /// Its probe was made as part of another's batch.
    Done(Result<Probe>),
    /// It holds a slot now: it takes the waiting reads and probes for them all.
    Lead(Slot),
}

/// Whether a read may probe now.
pub(crate) enum Admission {
    /// Yes, holding this slot until it is done.
    Now(Slot),
    /// Not yet: the answer, or the lead, comes through this channel.
    Later(oneshot::Receiver<Turn>),
}

/// One of the probes that may be out. Dropping it passes it to the first live waiter, who
/// leads the next batch, or frees it: when no one waits, or when it is over a lowered limit
/// while a batch is out.
pub(crate) struct Slot {
    shared: Option<Arc<Shared>>,
    /// Whether it was handed to a waiter as the lead of a batch.
    leads: bool,
}

impl ProbeQueue {
    /// A queue that lets up to `max_in_flight` probes out at once (0: no limit, no
    /// coalescing).
    pub(crate) fn new(max_in_flight: usize) -> Self {
        ProbeQueue {
            shared: Arc::new(Shared {
                max_in_flight,
                state: Mutex::new(State {
                    in_flight: 0,
                    limit: max_in_flight,
                    leading: 0,
                    waiting: VecDeque::new(),
                }),
            }),
        }
    }

    /// A slot now, or a place at the back of the queue for `keys`.
    pub(crate) fn admit(&self, keys: &[&str]) -> Admission {
        self.enter(keys, false)
    }

    /// Like [`admit`](Self::admit), for a read whose batch's leader was cancelled: it has
    /// waited its turn already, so it goes to the front.
    pub(crate) fn admit_again(&self, keys: &[&str]) -> Admission {
        self.enter(keys, true)
    }

    fn enter(&self, keys: &[&str], front: bool) -> Admission {
        let shared = &self.shared;
        if shared.max_in_flight == 0 {
            return Admission::Now(Slot {
                shared: None,
                leads: false,
            });
        }
        let mut state = shared.lock();
        if state.in_flight < state.limit {
            state.in_flight += 1;
            return Admission::Now(Slot {
                shared: Some(shared.clone()),
                leads: false,
            });
        }
        let (reply, receiver) = oneshot::channel();
        let waiter = Waiter {
            keys: Keys::copy(keys),
            reply,
        };
        if front {
            state.waiting.push_front(waiter);
        } else {
            state.waiting.push_back(waiter);
        }
        Admission::Later(receiver)
    }

    /// Takes waiting reads, oldest first, up to about [`MAX_BATCH_KEYS`] keys in all with the
    /// `already` keys of the leader's own read (none when those alone reach it). Reads whose
    /// callers were cancelled are dropped, not probed. How many live reads queued behind the
    /// leader's, and whether any are left behind, set the limit (see the module docs).
    pub(crate) fn take_waiting(&self, already: usize) -> Vec<Waiter> {
        let shared = &*self.shared;
        let mut state = shared.lock();
        let mut keys = already;
        let mut taken = Vec::new();
        while keys < MAX_BATCH_KEYS {
            let Some(waiter) = state.waiting.pop_front() else {
                break;
            };
            if waiter.reply.is_closed() {
                continue;
            }
            if !taken.is_empty() && keys + waiter.keys.len() > MAX_BATCH_KEYS {
                state.waiting.push_front(waiter);
                break;
            }
            keys += waiter.keys.len();
            taken.push(waiter);
        }
        // Reads left behind at the key cap need more than one batch out. With none left, the
        // batch is every live read that queued.
        let left_behind = !state.waiting.is_empty();
        state.limit = if taken.len() >= SATURATED_QUEUE_READS && !left_behind {
            SATURATED_LIMIT.min(shared.max_in_flight)
        } else {
            (state.limit * 2).min(shared.max_in_flight)
        };
        taken
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut led = self.leads;
        loop {
            let waiter = {
                let mut state = shared.lock();
                if led {
                    state.leading -= 1;
                }
                // Over a lowered limit, a probe returning while a batch is out is freed: that
                // batch's return leads the next. Within the limit, it goes to the first waiter,
                // who leads another batch.
                let over_limit = state.in_flight > state.limit && state.leading > 0;
                let next = if over_limit {
                    None
                } else {
                    state.waiting.pop_front()
                };
                let Some(waiter) = next else {
                    state.in_flight -= 1;
                    return;
                };
                state.leading += 1;
                waiter
            };
            let lead = Slot {
                shared: Some(shared.clone()),
                leads: true,
            };
            match waiter.reply.send(Turn::Lead(lead)) {
                Ok(()) => return,
                // That waiter was cancelled: the slot goes to the next one.
                Err(Turn::Lead(mut lead)) => {
                    lead.shared = None;
                    led = true;
                }
                Err(Turn::Done(_)) => unreachable!("a lead was sent"),
            }
        }
    }
}

impl Waiter {
    /// The waiter's keys.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter()
    }

    /// How many keys it waits for.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Sends the waiter its answer; a cancelled waiter is not told.
    pub(crate) fn answer(self, result: Result<Probe>) {
        let _ = self.reply.send(Turn::Done(result));
    }
}

/// Splits a batch's probe into one probe per read, in order: `lengths[i]` keys each.
pub(crate) fn split(probe: Probe, lengths: &[usize]) -> Vec<Probe> {
    let mut found = probe.found.into_iter();
    lengths
        .iter()
        .map(|&len| Probe {
            now_us: probe.now_us,
            clear_us: probe.clear_us,
            found: found.by_ref().take(len).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(queue: &ProbeQueue) -> usize {
        queue.shared.lock().waiting.len()
    }

    fn in_flight(queue: &ProbeQueue) -> usize {
        queue.shared.lock().in_flight
    }

    fn limit(queue: &ProbeQueue) -> usize {
        queue.shared.lock().limit
    }

    // The slot counts these tests expect (with maxima of 4 and 5) follow from it.
    const _: () = assert!(SATURATED_LIMIT == 2);

    /// What a waiting read is told; a read never told fails the test instead of hanging it.
    async fn told(
        waiting: oneshot::Receiver<Turn>,
    ) -> std::result::Result<Turn, oneshot::error::RecvError> {
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("a waiting read was never told its turn")
    }

    /// `n` reads admitted at once, each of its own key; all must wait.
    fn queue_up(queue: &ProbeQueue, n: usize) -> Vec<oneshot::Receiver<Turn>> {
        (0..n).map(|i| waits(queue, &[&i.to_string()])).collect()
    }

    /// All the slots of `queue` (a fresh one), taken by reads that go at once.
    fn fill(queue: &ProbeQueue) -> Vec<Slot> {
        (0..limit(queue))
            .map(|_| goes_now(queue, &["out"]))
            .collect()
    }

    /// The slot of a read of `keys` that must go at once.
    fn goes_now(queue: &ProbeQueue, keys: &[&str]) -> Slot {
        match queue.admit(keys) {
            Admission::Now(slot) => slot,
            Admission::Later(_) => panic!("a read of {keys:?} waits; it should go at once"),
        }
    }

    /// Where the turn of a read of `keys` that must wait comes.
    fn waits(queue: &ProbeQueue, keys: &[&str]) -> oneshot::Receiver<Turn> {
        match queue.admit(keys) {
            Admission::Later(waiting) => waiting,
            Admission::Now(_) => panic!("a read of {keys:?} goes at once; it should wait"),
        }
    }

    /// Saturates a fresh `queue`: every slot out, one returning to lead the 17 reads queued
    /// behind it, whose batch it takes. Returns the slots still out, the lead and the batch.
    async fn saturate(queue: &ProbeQueue) -> (Vec<Slot>, Slot, Vec<Waiter>) {
        let mut out = fill(queue);
        let mut waiters = queue_up(queue, SATURATED_QUEUE_READS + 1);
        drop(out.pop());
        let Ok(Turn::Lead(lead)) = told(waiters.remove(0)).await else {
            panic!("the first waiter leads");
        };
        let batch = queue.take_waiting(1);
        assert_eq!(batch.len(), SATURATED_QUEUE_READS);
        assert_eq!(
            limit(queue),
            SATURATED_LIMIT,
            "16 reads queued behind the leader"
        );
        (out, lead, batch)
    }

    #[tokio::test]
    async fn a_saturated_queue_goes_to_two_batches_and_small_batches_widen_it_again() {
        let queue = ProbeQueue::new(4);
        let (mut out, lead, _batch) = saturate(&queue).await;
        assert_eq!(in_flight(&queue), 4);
        // Over the lowered limit, probes returning while the batch is out are freed...
        let next = waits(&queue, &["next"]);
        drop(out.pop());
        drop(out.pop());
        assert_eq!((in_flight(&queue), waiting(&queue)), (2, 1));
        // ...down to the limit: the next one back leads a second batch.
        drop(out.pop());
        let Ok(Turn::Lead(second)) = told(next).await else {
            panic!("a probe back under the limit passes to the waiter");
        };
        assert_eq!(in_flight(&queue), 2);
        // Both batches out: a new read waits, and the first batch back leads it.
        let later = waits(&queue, &["later"]);
        drop(lead);
        let Ok(Turn::Lead(lead)) = told(later).await else {
            panic!("the batch's slot passes to the waiter");
        };
        assert!(queue.take_waiting(1).is_empty());
        assert_eq!(limit(&queue), 4, "a small batch doubles the limit");
        drop((lead, second));
        assert_eq!(in_flight(&queue), 0);
        let slots: Vec<_> = (0..5).map(|_| queue.admit(&["k"])).collect();
        assert!(matches!(slots[3], Admission::Now(_)));
        assert!(matches!(slots[4], Admission::Later(_)));
    }

    #[tokio::test]
    async fn fewer_reads_queued_than_the_threshold_keep_the_limit() {
        let queue = ProbeQueue::new(4);
        let mut out = fill(&queue);
        let mut waiters = queue_up(&queue, SATURATED_QUEUE_READS);
        drop(out.pop());
        let Ok(Turn::Lead(_lead)) = told(waiters.remove(0)).await else {
            panic!("the first waiter leads");
        };
        assert_eq!(queue.take_waiting(1).len(), SATURATED_QUEUE_READS - 1);
        assert_eq!(limit(&queue), 4);
    }

    #[tokio::test]
    async fn with_no_batch_out_the_first_probe_back_leads_the_next() {
        let queue = ProbeQueue::new(4);
        let (mut out, lead, _batch) = saturate(&queue).await;
        let mut later = queue_up(&queue, 2);
        // The batch comes back first: its slot leads the waiters, though 3 probes are out.
        drop(lead);
        let Ok(Turn::Lead(lead)) = told(later.remove(0)).await else {
            panic!("no batch is out: the returning slot leads");
        };
        assert_eq!(in_flight(&queue), 4);
        // With that batch out, the old probes are freed as they return, down to the limit;
        // the last leads a second batch.
        out.clear();
        let Ok(Turn::Lead(second)) = told(later.remove(0)).await else {
            panic!("a probe back under the limit leads");
        };
        assert_eq!((in_flight(&queue), waiting(&queue)), (2, 0));
        drop((lead, second));
        assert_eq!((in_flight(&queue), waiting(&queue)), (0, 0));
    }

    #[tokio::test]
    async fn a_cancelled_lead_under_a_lowered_limit_passes_on() {
        let queue = ProbeQueue::new(4);
        let (out, lead, _batch) = saturate(&queue).await;
        let mut later = queue_up(&queue, 2);
        // The waiter handed the next lead is gone: the lead goes past it, not lost.
        drop(later.remove(0));
        drop(lead);
        assert!(matches!(told(later.remove(0)).await, Ok(Turn::Lead(_))));
        drop(out);
        assert_eq!((in_flight(&queue), waiting(&queue)), (0, 0));
    }

    /// The slots out, the waiting reads and the batch taken, held by a test.
    type Saturated = (Vec<Slot>, Vec<oneshot::Receiver<Turn>>, Vec<Waiter>);

    /// Every slot of a fresh `queue` out, and a leader taking a batch of
    /// [`SATURATED_QUEUE_READS`] reads.
    fn take_a_saturating_batch(queue: &ProbeQueue) -> Saturated {
        let out = fill(queue);
        let waiting = queue_up(queue, SATURATED_QUEUE_READS);
        (out, waiting, queue.take_waiting(1))
    }

    #[test]
    fn the_limit_never_widens_past_its_maximum() {
        let queue = ProbeQueue::new(5);
        let _saturated = take_a_saturating_batch(&queue);
        assert_eq!(limit(&queue), SATURATED_LIMIT);
        let widened: Vec<usize> = (0..3)
            .map(|_| {
                queue.take_waiting(1);
                limit(&queue)
            })
            .collect();
        assert_eq!(widened, [4, 5, 5]);
    }

    #[test]
    fn a_maximum_of_one_stays_one_under_saturation() {
        let queue = ProbeQueue::new(1);
        let _saturated = take_a_saturating_batch(&queue);
        assert_eq!(limit(&queue), 1);
    }

    #[test]
    fn reads_left_behind_at_the_key_cap_keep_the_limit_up() {
        let queue = ProbeQueue::new(4);
        let _out = fill(&queue);
        let many: Vec<String> = (0..600).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let _waiting: Vec<_> = (0..SATURATED_QUEUE_READS)
            .map(|_| queue.admit(&many))
            .collect();
        assert_eq!(queue.take_waiting(1).len(), 1);
        assert_eq!(
            limit(&queue),
            4,
            "one batch per round trip cannot drain them"
        );
    }

    #[test]
    fn a_waiter_keeps_its_keys_in_order() {
        for keys in [&[][..], &["a"], &["", "bc", "d"], &["ключ", "k:1", ""]] {
            let copied = Keys::copy(keys);
            assert_eq!(copied.len(), keys.len());
            assert_eq!(copied.iter().collect::<Vec<_>>(), keys);
        }
    }

    #[test]
    fn reads_below_the_limit_go_at_once() {
        let queue = ProbeQueue::new(2);
        let a = queue.admit(&["a"]);
        let b = queue.admit(&["b"]);
        assert!(matches!(a, Admission::Now(_)));
        assert!(matches!(b, Admission::Now(_)));
        assert!(matches!(queue.admit(&["c"]), Admission::Later(_)));
        drop((a, b));
    }

    #[test]
    fn no_limit_never_queues() {
        let queue = ProbeQueue::new(0);
        let slots: Vec<_> = (0..100).map(|_| queue.admit(&["k"])).collect();
        assert!(slots.iter().all(|s| matches!(s, Admission::Now(_))));
    }

    #[tokio::test]
    async fn a_freed_slot_hands_the_lead_to_the_first_waiter() {
        let queue = ProbeQueue::new(1);
        let slot = goes_now(&queue, &["a"]);
        let first = waits(&queue, &["b"]);
        let second = waits(&queue, &["c", "d"]);
        drop(slot);
        let Ok(Turn::Lead(lead)) = told(first).await else {
            panic!("the first waiter leads");
        };
        let batch = queue.take_waiting(1);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].keys().collect::<Vec<_>>(), ["c", "d"]);
        let probe = Probe {
            now_us: 7,
            clear_us: 3,
            found: vec![None, None],
        };
        for (waiter, probe) in batch.into_iter().zip(split(probe, &[2])) {
            waiter.answer(Ok(probe));
        }
        let Ok(Turn::Done(Ok(probe))) = told(second).await else {
            panic!("the second waiter is answered by the leader");
        };
        assert_eq!((probe.now_us, probe.clear_us, probe.found.len()), (7, 3, 2));
        drop(lead);
        assert_eq!((in_flight(&queue), waiting(&queue)), (0, 0));
    }

    #[tokio::test]
    async fn cancelled_waiters_neither_strand_others_nor_leak_slots() {
        let queue = ProbeQueue::new(1);
        let slot = goes_now(&queue, &["a"]);
        let cancelled = waits(&queue, &["b"]);
        let live = waits(&queue, &["c"]);
        drop(cancelled);
        drop(slot);
        let Ok(Turn::Lead(lead)) = told(live).await else {
            panic!("the slot skips the cancelled waiter");
        };
        // A lead sent to a waiter that never reads it is freed with the message.
        let never_read = waits(&queue, &["d"]);
        drop(lead);
        assert_eq!(in_flight(&queue), 1, "the slot passed to the waiter");
        drop(never_read);
        assert_eq!((in_flight(&queue), waiting(&queue)), (0, 0));
    }

    #[test]
    fn a_batch_stops_near_the_key_limit() {
        let queue = ProbeQueue::new(1);
        let _slot = queue.admit(&["a"]);
        let many: Vec<String> = (0..600).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let _w1 = queue.admit(&many);
        let _w2 = queue.admit(&many);
        assert_eq!(queue.take_waiting(1).len(), 1);
        assert_eq!(waiting(&queue), 1);
    }

    #[test]
    fn a_leader_skips_cancelled_waiters_and_requeued_reads_go_first() {
        let queue = ProbeQueue::new(1);
        let _slot = queue.admit(&["a"]);
        let cancelled = queue.admit(&["b"]);
        let _live = queue.admit(&["c"]);
        let _again = queue.admit_again(&["d"]);
        drop(cancelled);
        let taken = queue.take_waiting(1);
        let keys: Vec<&str> = taken.iter().flat_map(Waiter::keys).collect();
        assert_eq!(keys, ["d", "c"]);
    }

    #[test]
    fn a_leader_at_the_key_limit_takes_no_one() {
        let queue = ProbeQueue::new(1);
        let _slot = queue.admit(&["a"]);
        let _waiter = queue.admit(&["b"]);
        assert!(queue.take_waiting(MAX_BATCH_KEYS).is_empty());
        assert_eq!(waiting(&queue), 1);
    }
}
