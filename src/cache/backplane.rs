//! The backplane: a Redis pub/sub channel per named cache, versioned in its name, on which
//! each instance announces what it wrote, removed or invalidated, so that the others drop
//! those entries from their L0 (and re-read them lazily). Messages carry keys or tags, never
//! values, and the sender's id, so an instance ignores its own.

use std::borrow::Cow;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::store::{Notice, NoticeHandler};
use crate::redis::RedisConnection;

/// The wire format version, also part of the channel name.
const VERSION: u32 = 1;

/// The channel of one named cache.
pub(crate) fn channel(prefix: &str, cache: &str) -> String {
    format!("{prefix}:{cache}:backplane:v{VERSION}")
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    Written,
    Removed,
    Tags,
    Cleared,
}

#[derive(Serialize, Deserialize)]
struct Message<'a> {
    /// Format version.
    v: u32,
    /// The sending instance.
    s: u64,
    a: Action,
    /// Keys or tags.
    #[serde(default, borrow)]
    k: Vec<Cow<'a, str>>,
}

/// The message announcing `notice` from `source`.
pub(crate) fn encode(source: u64, action: &Notice) -> Vec<u8> {
    let (a, items): (Action, &[String]) = match action {
        Notice::Written(keys) => (Action::Written, keys),
        Notice::Removed(keys) => (Action::Removed, keys),
        Notice::TagsInvalidated(tags) => (Action::Tags, tags),
        Notice::Cleared | Notice::Resubscribed => (Action::Cleared, &[]),
    };
    let message = Message {
        v: VERSION,
        s: source,
        a,
        k: items.iter().map(|k| Cow::Borrowed(k.as_str())).collect(),
    };
    serde_json::to_vec(&message).unwrap_or_default()
}

/// The sender and notice of a message; `None` for bytes that are not a message of this
/// version (ignored, never a panic).
pub(crate) fn decode(bytes: &[u8]) -> Option<(u64, Notice)> {
    let message: Message<'_> = serde_json::from_slice(bytes).ok()?;
    if message.v != VERSION {
        return None;
    }
    let items = || message.k.iter().map(|k| k.clone().into_owned()).collect();
    let notice = match message.a {
        Action::Written => Notice::Written(items()),
        Action::Removed => Notice::Removed(items()),
        Action::Tags => Notice::TagsInvalidated(items()),
        Action::Cleared => Notice::Cleared,
    };
    Some((message.s, notice))
}

/// Subscribes to `channel` on a dedicated connection and hands other instances' notices to
/// `handler` until `stop` is dropped. Reconnects with backoff; after every reconnection it
/// hands over [`Notice::Resubscribed`], since messages may have been missed meanwhile.
pub(crate) fn spawn_subscriber(
    connection: RedisConnection,
    channel: String,
    source: u64,
    handler: NoticeHandler,
    mut stop: watch::Receiver<()>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(channel = %channel, "no Tokio runtime where the cache was built: the backplane is not started");
        return;
    };
    runtime.spawn(async move {
        let mut subscribed_before = false;
        let mut pause = Duration::from_millis(50);
        loop {
            if let Ok(mut pubsub) = connection.pubsub().await {
                let subscribed = tokio::time::timeout(
                    connection.op_timeout().max(Duration::from_secs(1)),
                    pubsub.subscribe(&channel),
                )
                .await;
                if let Ok(Ok(())) = subscribed {
                    if subscribed_before {
                        tracing::info!(channel = %channel, "backplane resubscribed; flushing L0");
                        handler(Notice::Resubscribed).await;
                    }
                    subscribed_before = true;
                    pause = Duration::from_millis(50);
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(message) => {
                                    if let Some((sender, notice)) = decode(message.get_payload_bytes())
                                        && sender != source
                                    {
                                        handler(notice).await;
                                    }
                                }
                                None => break,
                            },
                            _ = stop.changed() => return,
                        }
                    }
                    tracing::warn!(channel = %channel, "backplane subscription lost; reconnecting");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_foreign_bytes_are_ignored() {
        for notice in [
            Notice::Written(vec!["a".into(), "b\"{}\u{1f}".into()]),
            Notice::Removed(vec!["k".into()]),
            Notice::TagsInvalidated(vec!["user:1".into()]),
            Notice::Cleared,
        ] {
            let bytes = encode(42, &notice);
            assert_eq!(decode(&bytes), Some((42, notice)));
        }
        assert_eq!(decode(b"garbage"), None);
        assert_eq!(decode(br#"{"v":2,"s":1,"a":"cleared","k":[]}"#), None);
        assert_ne!(channel("p", "a"), channel("p", "b"));
    }
}
