//! The cache envelope: a small versioned header, the entry's tags, and a serde payload,
//! lz4-compressed above a threshold when that shrinks it.
//!
//! Layout of format version 1 (all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0 | magic `0x9E` |
//! | 1 | format version (`1`) |
//! | 2 | flags: bit 0 = lz4, bits 4-5 = serde format (0 postcard, 1 MessagePack, 2 JSON); others zero |
//! | 3 | tag count `n` |
//! | 4..12 | created-at, microseconds since the Unix epoch, on the store's clock |
//! | 12..20 | logical expiry, microseconds since the Unix epoch, on the store's clock |
//! | 20.. | `n` tags, each a length byte and that many UTF-8 bytes |
//! | then | payload; when lz4 is set, a `u32` uncompressed length and an lz4 block |
//!
//! The tags sit at fixed, simple offsets so that the Redis probe script can read them and
//! fetch their invalidation timestamps in the same round trip as the entry itself. Bytes
//! that do not parse are an [`Error::Corrupt`]: callers treat them as a miss, never a panic.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, excerpt};

/// First byte of every envelope.
pub const MAGIC: u8 = 0x9E;
/// The envelope format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Size of the fixed header, before the tags.
pub const HEADER_LEN: usize = 20;
/// Longest tag the envelope can carry (its length is one byte).
pub const MAX_TAG_LEN: usize = u8::MAX as usize;
/// Most tags the envelope can carry (the count is one byte).
pub const MAX_TAGS: usize = u8::MAX as usize;

const FLAG_LZ4: u8 = 0b0000_0001;
const FORMAT_SHIFT: u8 = 4;
const FORMAT_MASK: u8 = 0b0011_0000;
const KNOWN_FLAGS: u8 = FLAG_LZ4 | FORMAT_MASK;

/// The serde format of the payload. Recorded in each envelope, so a reader decodes entries
/// written in any format whatever its own setting.
///
/// Measured on the benchmark's 1 KiB chat message (`cargo bench --bench cache -- format`):
/// postcard decodes in ~170 ns and takes 897 B; MessagePack with named fields ~300 ns and
/// 980 B; JSON ~470 ns and 1018 B.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Format {
    /// postcard (the default): the fastest and smallest. It is positional, not
    /// self-describing: values that need `deserialize_any` (`serde_json::Value`, untagged
    /// enums, `skip_serializing_if`) must use another format, and a change to `V`'s fields
    /// must come with a new cache name or key prefix (an entry that no longer decodes is a
    /// miss, but one that still decodes would be misread).
    #[default]
    Postcard,
    /// MessagePack with named fields: self-describing, so fields can be added between deploys
    /// and `serde_json::Value` round-trips.
    MessagePack,
    /// JSON: readable with `redis-cli`, slower and larger.
    Json,
}

impl Format {
    fn code(self) -> u8 {
        match self {
            Format::Postcard => 0,
            Format::MessagePack => 1,
            Format::Json => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Format::Postcard),
            1 => Some(Format::MessagePack),
            2 => Some(Format::Json),
            _ => None,
        }
    }
}

/// How values are turned into envelopes.
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    /// Payload format.
    pub format: Format,
    /// Payloads of at least this many bytes are lz4-compressed (kept only if smaller).
    pub compress_threshold: usize,
    /// Largest envelope accepted, in bytes, on write and on read.
    pub max_value_bytes: usize,
}

/// An encoded envelope, and what its payload cost before and after compression.
#[derive(Debug)]
pub struct Encoded {
    /// The whole envelope.
    pub bytes: Vec<u8>,
    /// Payload bytes before compression.
    pub raw_len: usize,
    /// Payload bytes as stored (equal to `raw_len` when not compressed).
    pub stored_len: usize,
}

/// The parsed header of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Creation time, µs since the epoch on the store's clock.
    pub created_us: u64,
    /// Logical expiry, µs since the epoch on the store's clock.
    pub expires_us: u64,
    /// The entry's tags, in the order they were written.
    pub tags: Vec<String>,
    /// Where the payload starts.
    payload_at: usize,
    flags: u8,
}

/// A decoded envelope.
#[derive(Debug)]
pub struct Decoded<V> {
    /// The header.
    pub header: Header,
    /// The value.
    pub value: V,
}

/// Encodes `value` with `tags` into an envelope whose timestamps are zero; the store stamps
/// them with its own clock when it writes (see [`stamp`]).
pub fn encode<V: Serialize>(
    key: &str,
    value: &V,
    tags: &[String],
    options: &EncodeOptions,
) -> Result<Encoded> {
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid(
            "tags",
            format!("{} tags, the envelope holds at most {MAX_TAGS}", tags.len()),
        ));
    }
    let tags_len: usize = tags.iter().map(|t| 1 + t.len()).sum();
    let mut bytes = Vec::with_capacity(HEADER_LEN + tags_len + 256);
    bytes.extend_from_slice(&[
        MAGIC,
        VERSION,
        options.format.code() << FORMAT_SHIFT,
        tags.len() as u8,
    ]);
    bytes.extend_from_slice(&[0; 16]);
    for tag in tags {
        let len = u8::try_from(tag.len()).map_err(|_| {
            Error::invalid(
                "tag",
                format!(
                    "{:?} is {} bytes, at most {MAX_TAG_LEN}",
                    excerpt(tag),
                    tag.len()
                ),
            )
        })?;
        bytes.push(len);
        bytes.extend_from_slice(tag.as_bytes());
    }
    let payload_at = bytes.len();
    let encode_error = |source: crate::error::BoxError| Error::Codec {
        action: "encode",
        key: excerpt(key),
        source,
    };
    match options.format {
        Format::Postcard => {
            bytes = postcard::to_extend(value, bytes).map_err(|e| encode_error(Box::new(e)))?
        }
        Format::MessagePack => rmp_serde::encode::write_named(&mut bytes, value)
            .map_err(|e| encode_error(Box::new(e)))?,
        Format::Json => {
            serde_json::to_writer(&mut bytes, value).map_err(|e| encode_error(Box::new(e)))?
        }
    }
    let raw_len = bytes.len() - payload_at;
    let mut stored_len = raw_len;
    if raw_len >= options.compress_threshold {
        let compressed = lz4_flex::block::compress(&bytes[payload_at..]);
        if compressed.len() + 4 < raw_len {
            bytes.truncate(payload_at);
            bytes.extend_from_slice(&(raw_len as u32).to_be_bytes());
            bytes.extend_from_slice(&compressed);
            bytes[2] |= FLAG_LZ4;
            stored_len = compressed.len() + 4;
        }
    }
    if bytes.len() > options.max_value_bytes {
        return Err(Error::ValueTooLarge {
            key: excerpt(key),
            size: bytes.len(),
            limit: options.max_value_bytes,
        });
    }
    Ok(Encoded {
        bytes,
        raw_len,
        stored_len,
    })
}

/// Writes the creation and expiry timestamps into an envelope's header.
pub fn stamp(bytes: &mut [u8], created_us: u64, expires_us: u64) -> Result<()> {
    if bytes.len() < HEADER_LEN || bytes[0] != MAGIC {
        return Err(Error::corrupt("too short or wrong magic byte to stamp"));
    }
    bytes[4..12].copy_from_slice(&created_us.to_be_bytes());
    bytes[12..20].copy_from_slice(&expires_us.to_be_bytes());
    Ok(())
}

/// Parses the header and tags of an envelope without touching the payload.
pub fn header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::corrupt(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[0] != MAGIC {
        return Err(Error::corrupt(format!(
            "magic byte is {:#04x}, not {MAGIC:#04x}",
            bytes[0]
        )));
    }
    if bytes[1] != VERSION {
        return Err(Error::corrupt(format!(
            "format version {} is not the supported version {VERSION}",
            bytes[1]
        )));
    }
    let flags = bytes[2];
    if flags & !KNOWN_FLAGS != 0
        || Format::from_code((flags & FORMAT_MASK) >> FORMAT_SHIFT).is_none()
    {
        return Err(Error::corrupt(format!("unknown flags {flags:#010b}")));
    }
    let tag_count = bytes[3] as usize;
    let created_us = u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let expires_us = u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let mut at = HEADER_LEN;
    let mut tags = Vec::with_capacity(tag_count);
    for _ in 0..tag_count {
        let len = *bytes
            .get(at)
            .ok_or_else(|| Error::corrupt("truncated in the tag list"))? as usize;
        let raw = bytes
            .get(at + 1..at + 1 + len)
            .ok_or_else(|| Error::corrupt("truncated in the tag list"))?;
        let tag = std::str::from_utf8(raw).map_err(|_| Error::corrupt("a tag is not UTF-8"))?;
        tags.push(tag.to_owned());
        at += 1 + len;
    }
    Ok(Header {
        created_us,
        expires_us,
        tags,
        payload_at: at,
        flags,
    })
}

/// Decodes a whole envelope. `max_value_bytes` bounds the decompressed payload, so a
/// corrupt length prefix cannot make it allocate more.
pub fn decode<V: DeserializeOwned + 'static>(
    key: &str,
    bytes: &[u8],
    max_value_bytes: usize,
) -> Result<Decoded<V>> {
    let header = header(bytes)?;
    let body = &bytes[header.payload_at..];
    let decompressed;
    let payload = if header.flags & FLAG_LZ4 != 0 {
        let (len, block) = body
            .split_first_chunk::<4>()
            .ok_or_else(|| Error::corrupt("compressed payload shorter than its length prefix"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > max_value_bytes {
            return Err(Error::corrupt(format!(
                "compressed payload claims {len} bytes, over the limit of {max_value_bytes}"
            )));
        }
        decompressed = lz4_flex::block::decompress(block, len)
            .map_err(|e| Error::corrupt(format!("lz4 block does not decompress: {e}")))?;
        &decompressed[..]
    } else {
        body
    };
    let format = Format::from_code((header.flags & FORMAT_MASK) >> FORMAT_SHIFT)
        .ok_or_else(|| Error::corrupt("unknown serde format"))?;
    let decode_error = |source: crate::error::BoxError| Error::Codec {
        action: "decode",
        key: excerpt(key),
        source,
    };
    if format == Format::Postcard
        && let Some(value) = embedding_fast_path::<V>(payload)
    {
        return Ok(Decoded { header, value });
    }
    let value = match format {
        Format::Postcard => postcard::from_bytes(payload).map_err(|e| decode_error(Box::new(e)))?,
        Format::MessagePack => {
            rmp_serde::from_slice(payload).map_err(|e| decode_error(Box::new(e)))?
        }
        Format::Json => serde_json::from_slice(payload).map_err(|e| decode_error(Box::new(e)))?,
    };
    Ok(Decoded { header, value })
}

/// Embeddings (`Vec<f32>`) are the values an AI service caches most. serde decodes a
/// sequence one element at a time through a visitor; postcard's layout for them (a varint
/// length, then little-endian floats) can be read in one pass instead, several times faster.
/// `None` for any other type, or bytes that are not exactly that layout (the generic decoder
/// then reports what is wrong).
fn embedding_fast_path<V: 'static>(payload: &[u8]) -> Option<V> {
    if std::any::TypeId::of::<V>() != std::any::TypeId::of::<Vec<f32>>() {
        return None;
    }
    let (len, floats) = postcard_varint(payload)?;
    let (floats, rest) = floats.as_chunks::<4>();
    if floats.len() != len || !rest.is_empty() {
        return None;
    }
    // Fixed-size chunks: this compiles to a vectorized copy.
    let vector: Vec<f32> = floats.iter().map(|b| f32::from_le_bytes(*b)).collect();
    // V is Vec<f32> (checked above); moving through `Any` needs no allocation.
    let mut slot = Some(vector);
    (&mut slot as &mut dyn std::any::Any)
        .downcast_mut::<Option<V>>()?
        .take()
}

/// A postcard varint (LEB128, at most 10 bytes) at the start of `bytes`, and the rest.
fn postcard_varint(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut value: u64 = 0;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((usize::try_from(value).ok()?, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[test]
    fn embeddings_decode_through_the_fast_path_exactly_as_serde_does() {
        for len in [0usize, 1, 127, 128, 256, 1_536, 20_000] {
            let vector: Vec<f32> = (0..len).map(|i| i as f32 * 0.25 - 3.0).collect();
            let bytes = postcard::to_allocvec(&vector).unwrap();
            assert_eq!(
                embedding_fast_path::<Vec<f32>>(&bytes),
                Some(vector.clone())
            );
            let slow: Vec<f32> = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(slow, vector);
        }
        // Other types, truncated or padded bytes, and an overlong varint go the generic way.
        let bytes = postcard::to_allocvec(&vec![1.0f32, 2.0]).unwrap();
        assert_eq!(embedding_fast_path::<Vec<f64>>(&bytes), None);
        assert_eq!(
            embedding_fast_path::<Vec<f32>>(&bytes[..bytes.len() - 1]),
            None
        );
        let mut padded = bytes.clone();
        padded.push(0);
        assert_eq!(embedding_fast_path::<Vec<f32>>(&padded), None);
        assert_eq!(embedding_fast_path::<Vec<f32>>(&[0xff; 11]), None);
        assert_eq!(embedding_fast_path::<Vec<f32>>(&[]), None);
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Message {
        id: u64,
        text: String,
    }

    fn options(format: Format) -> EncodeOptions {
        EncodeOptions {
            format,
            compress_threshold: 1024,
            max_value_bytes: 1 << 20,
        }
    }

    fn message(len: usize) -> Message {
        Message {
            id: 7,
            text: "hello world ".repeat(len / 12 + 1),
        }
    }

    #[test]
    fn round_trips_in_both_formats_with_tags_and_stamps() {
        for format in [Format::Postcard, Format::MessagePack, Format::Json] {
            let tags = vec!["user:42".to_owned(), "conv:9".to_owned()];
            let mut enc = encode("k", &message(100), &tags, &options(format)).unwrap();
            stamp(&mut enc.bytes, 1_000, 61_000).unwrap();
            let dec: Decoded<Message> = decode("k", &enc.bytes, 1 << 20).unwrap();
            assert_eq!(dec.value, message(100));
            assert_eq!(dec.header.tags, tags);
            assert_eq!(
                (dec.header.created_us, dec.header.expires_us),
                (1_000, 61_000)
            );
        }
    }

    #[test]
    fn compresses_large_payloads_only_when_it_shrinks_them() {
        let small = encode("k", &message(100), &[], &options(Format::MessagePack)).unwrap();
        assert_eq!(small.raw_len, small.stored_len);
        let large = encode("k", &message(4096), &[], &options(Format::MessagePack)).unwrap();
        assert!(large.stored_len < large.raw_len / 4, "{large:?}");
        let back: Decoded<Message> = decode("k", &large.bytes, 1 << 20).unwrap();
        assert_eq!(back.value, message(4096));
        // Random bytes do not compress: stored as they are.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let noise: Vec<u64> = (0..1024)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            })
            .collect();
        let enc = encode("k", &noise, &[], &options(Format::MessagePack)).unwrap();
        assert_eq!(enc.raw_len, enc.stored_len);
        assert_eq!(enc.bytes[2] & FLAG_LZ4, 0);
    }

    #[test]
    fn refuses_values_over_the_limit_and_names_the_size() {
        let mut opts = options(Format::Json);
        opts.max_value_bytes = 64;
        let err = encode("big", &message(500), &[], &opts).unwrap_err();
        assert!(
            matches!(err, Error::ValueTooLarge { limit: 64, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("over the limit of 64 bytes"),
            "{err}"
        );
    }

    #[test]
    fn garbage_truncation_and_future_versions_are_corrupt_not_panics() {
        let good = encode(
            "k",
            &message(4096),
            &["t".to_owned()],
            &options(Format::MessagePack),
        )
        .unwrap();
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            b"not an envelope at all".to_vec(),
            {
                let mut v = good.bytes.clone();
                v[1] = VERSION + 1;
                v
            },
            {
                let mut v = good.bytes.clone();
                v[2] |= 0b1000_0000;
                v
            },
            good.bytes[..good.bytes.len() / 2].to_vec(),
            good.bytes[..HEADER_LEN + 1].to_vec(),
            {
                // A length prefix that claims 4 GiB.
                let mut v = good.bytes.clone();
                let at = HEADER_LEN + 2;
                v[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
                v
            },
        ];
        for (i, bytes) in cases.iter().enumerate() {
            let result = decode::<Message>("k", bytes, 1 << 20);
            assert!(result.is_err(), "case {i} decoded");
        }
        // Every prefix of a valid envelope is rejected without a panic.
        for end in 0..good.bytes.len() {
            let _ = decode::<Message>("k", &good.bytes[..end], 1 << 20);
        }
    }

    #[test]
    fn a_payload_of_another_type_is_a_codec_error() {
        let enc = encode("k", &"just a string", &[], &options(Format::MessagePack)).unwrap();
        let err = decode::<Message>("k", &enc.bytes, 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Codec {
                    action: "decode",
                    ..
                }
            ),
            "{err}"
        );
    }
}
