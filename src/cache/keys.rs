//! Validation of caller-supplied keys, tags and names, and the Redis key layout.
//!
//! Keys and tags come from callers and are untrusted: they are bounded in length, and a key
//! is escaped so that it can neither leave its cache's prefix nor change its hash tag.

use crate::error::{Error, Result, excerpt};

/// The hasher of the maps that a read looks caller keys and tags up in: what a Redis store
/// last saw of each key, the tag stamps it learnt, and a batch's repeated keys. rapidhash
/// costs a fraction of std's SipHash on keys of tens of bytes, and those lookups run several
/// times per key read. Against hash flooding it offers less than SipHash, a keyed PRF: each
/// map gets a random seed and the hash's secrets come from std's random source, so keys
/// cannot be aimed at one bucket without them, but rapidhash claims only minimal resistance.
/// The damage is bounded: the long-lived maps hold at most about 3,125 entries per shard,
/// and a batch's map lives for one call.
pub(crate) type KeyHasher = rapidhash::fast::RandomState;

/// Checks a cache key: not empty, at most `max_bytes` bytes.
pub(crate) fn check_key(key: &str, max_bytes: usize) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("cache key", "the key is empty"));
    }
    if key.len() > max_bytes {
        return Err(Error::invalid(
            "cache key",
            format!(
                "{:?} is {} bytes, over the limit of {max_bytes}",
                excerpt(key),
                key.len()
            ),
        ));
    }
    Ok(())
}

/// Checks an entry's or an invalidation's tags: each not empty and at most `max_bytes`
/// bytes, and at most `max_count` of them.
pub(crate) fn check_tags<S: AsRef<str>>(
    tags: &[S],
    max_bytes: usize,
    max_count: usize,
) -> Result<()> {
    if tags.len() > max_count {
        return Err(Error::invalid(
            "tags",
            format!(
                "{} tags, over the limit of {max_count} per call",
                tags.len()
            ),
        ));
    }
    for tag in tags {
        let tag = tag.as_ref();
        if tag.is_empty() {
            return Err(Error::invalid("tag", "a tag is empty"));
        }
        if tag.len() > max_bytes {
            return Err(Error::invalid(
                "tag",
                format!(
                    "{:?} is {} bytes, over the limit of {max_bytes}",
                    excerpt(tag),
                    tag.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks a name that becomes part of Redis keys (cache name, tier name, key prefix):
/// 1 to 64 characters out of `A-Z a-z 0-9 _ - .`.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            format!(
                "{:?} must be 1 to 64 characters out of A-Z a-z 0-9 _ - .",
                excerpt(name)
            ),
        ))
    }
}

/// Where a named cache's entries, tags and clear marker live in Redis.
///
/// ```text
/// {prefix}:{cache}:{<escaped key>}:{tier}   an entry in one tier
/// {prefix}:{cache}:{<escaped key>}:#        its read counter (promotion)
/// {prefix}:{cache}:tag:{tag}                a tag's invalidation timestamp
/// {prefix}:{cache}:clear                    the cache's clear timestamp
/// ```
///
/// All keys of one entry share the hash tag `{<escaped key>}`, so they live in one Redis
/// Cluster slot. `{`, `}` and `%` in a key are percent-escaped, so the hash tag is always the
/// whole key and a key cannot reach another entry's or another cache's keys.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct KeyLayout {
    namespace: String,
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl KeyLayout {
    pub(crate) fn new(prefix: &str, cache: &str) -> Self {
        KeyLayout {
            namespace: format!("{prefix}:{cache}"),
        }
    }

    /// The part shared by all of an entry's keys: `{prefix}:{cache}:{<escaped key>}`.
    pub(crate) fn entry(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.namespace.len() + key.len() + 8);
        self.write_entry(&mut out, key);
        out
    }

    /// The key of one tier's copy of the entry under `key`, written into `out` (cleared
    /// first), so a batch can build all its keys in one buffer.
    pub(crate) fn write_entry_tier(&self, out: &mut String, key: &str, tier: &str) {
        out.clear();
        self.write_entry(out, key);
        out.push(':');
        out.push_str(tier);
    }

    fn write_entry(&self, out: &mut String, key: &str) {
        out.push_str(&self.namespace);
        out.push_str(":{");
        // Runs without an escaped byte are copied whole; the three are ASCII, so every cut
        // falls on a character boundary.
        let mut rest = key;
        while let Some(at) = rest.bytes().position(|b| matches!(b, b'%' | b'{' | b'}')) {
            out.push_str(&rest[..at]);
            out.push_str(match rest.as_bytes()[at] {
                b'%' => "%25",
                b'{' => "%7B",
                _ => "%7D",
            });
            rest = &rest[at + 1..];
        }
        out.push_str(rest);
        out.push('}');
    }

    /// The key of one tier's copy of an entry.
    pub(crate) fn tier_key(entry: &str, tier: &str) -> String {
        format!("{entry}:{tier}")
    }

    /// Everything before a tag in its timestamp key.
    pub(crate) fn tag_prefix(&self) -> String {
        format!("{}:tag:", self.namespace)
    }

    /// The key of the cache-wide clear timestamp.
    pub(crate) fn clear_key(&self) -> String {
        format!("{}:clear", self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_and_not_empty() {
        assert!(check_key("user:42", 512).is_ok());
        let err = check_key("", 512).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = check_key(&"k".repeat(513), 512).unwrap_err();
        assert!(
            err.to_string().contains("513 bytes, over the limit of 512"),
            "{err}"
        );
    }

    #[test]
    fn tags_are_bounded_in_length_and_count() {
        assert!(check_tags(&["a", "b"], 128, 16).is_ok());
        assert!(check_tags(&[""], 128, 16).is_err());
        assert!(check_tags(&["x".repeat(129)], 128, 16).is_err());
        let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        let err = check_tags(&many, 128, 16).unwrap_err();
        assert!(err.to_string().contains("17 tags"), "{err}");
    }

    #[test]
    fn names_allow_a_safe_alphabet_only() {
        for good in ["default", "user-profiles", "v1.embeddings_7d"] {
            assert!(check_name("cache name", good).is_ok(), "{good}");
        }
        for bad in ["", "has space", "a:b", "a{b}", "*", &"n".repeat(65)] {
            assert!(check_name("cache name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_cannot_change_its_hash_tag_or_leave_its_prefix() {
        let layout = KeyLayout::new("pupkit", "msgs");
        assert_eq!(layout.entry("user:42"), "pupkit:msgs:{user:42}");
        let mut buf = String::from("left over");
        layout.write_entry_tier(&mut buf, "user:42", "hot");
        assert_eq!(buf, "pupkit:msgs:{user:42}:hot");
        layout.write_entry_tier(&mut buf, "{", "hot");
        assert_eq!(buf, KeyLayout::tier_key(&layout.entry("{"), "hot"));
        // Braces would otherwise end the hash tag early, or make it empty.
        let tricky = layout.entry("}x{:hot");
        assert_eq!(tricky, "pupkit:msgs:{%7Dx%7B:hot}");
        assert!(tricky.starts_with("pupkit:msgs:{"));
        let hash_tag = &tricky[tricky.find('{').unwrap() + 1..tricky.find('}').unwrap()];
        assert_eq!(hash_tag, "%7Dx%7B:hot");
        // Escapes between multi-byte characters keep the characters whole.
        assert_eq!(layout.entry("é{%}ü"), "pupkit:msgs:{é%7B%25%7Dü}");
        // Escaping is injective: "%7B" and "{" stay distinct.
        assert_ne!(layout.entry("%7B"), layout.entry("{"));
        // A key never lands in the tag or clear namespaces.
        assert!(!layout.entry("tag:x").starts_with(&layout.tag_prefix()));
        assert_ne!(layout.entry("clear"), layout.clear_key());
    }
}
