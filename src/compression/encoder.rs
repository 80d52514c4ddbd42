//! The encoders and decoders: whole bodies, and streams that flush on demand.

use std::fmt;
use std::io::{self, Read, Write};

use bytes::Bytes;
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use super::negotiate::Encoding;
use super::policy::CompressionConfig;

/// Brotli's internal buffer size for our writers and readers.
const BROTLI_BUFFER: usize = 4096;

/// Compresses a whole body.
///
/// ```
/// use pupkit::compression::{compress, decompress, CompressionConfig, Encoding};
///
/// let config = CompressionConfig::default();
/// let body = br#"{"messages": ["hello", "hello", "hello", "hello"]}"#.repeat(50);
/// let packed = compress(&body, Encoding::Brotli, &config)?;
/// assert!(packed.len() < body.len() / 10);
/// assert_eq!(decompress(&packed, Encoding::Brotli, 1 << 20)?, body);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn compress(
    body: &[u8],
    encoding: Encoding,
    config: &CompressionConfig,
) -> io::Result<Vec<u8>> {
    let mut encoder = StreamEncoder::new(encoding, config);
    let mut out = encoder.write(body)?.to_vec();
    out.extend_from_slice(&encoder.finish()?);
    Ok(out)
}

/// Why a compressed body could not be decoded.
#[derive(Debug)]
#[non_exhaustive]
pub enum DecodeError {
    /// It decodes to more than the limit: 413.
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// It is not valid data in its coding: 400.
    Corrupt {
        /// The coding.
        encoding: Encoding,
        /// The decoder's complaint.
        reason: String,
    },
    /// A `Content-Encoding` this crate cannot decode: 415.
    Unsupported {
        /// The coding named (truncated).
        coding: String,
    },
}

impl DecodeError {
    /// The HTTP status that fits: 413, 400 or 415.
    pub fn status(&self) -> u16 {
        match self {
            DecodeError::TooLarge { .. } => 413,
            DecodeError::Corrupt { .. } => 400,
            DecodeError::Unsupported { .. } => 415,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { limit } => {
                write!(f, "the request body decodes to more than {limit} bytes")
            }
            DecodeError::Corrupt { encoding, reason } => {
                write!(f, "the request body is not valid {encoding}: {reason}")
            }
            DecodeError::Unsupported { coding } => {
                write!(
                    f,
                    "content encoding {coding:?} is not supported (use br or gzip)"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes a whole body, reading at most `limit + 1` decoded bytes, so a zip bomb costs
/// `limit` bytes of memory and no more.
pub fn decompress(body: &[u8], encoding: Encoding, limit: usize) -> Result<Vec<u8>, DecodeError> {
    let reader: Box<dyn Read + '_> = match encoding {
        Encoding::Brotli => Box::new(brotli::Decompressor::new(body, BROTLI_BUFFER)),
        Encoding::Gzip => Box::new(MultiGzDecoder::new(body)),
        Encoding::Identity => Box::new(body),
    };
    let mut out = Vec::with_capacity(body.len().min(limit).saturating_mul(4).min(limit));
    reader
        .take((limit as u64).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Corrupt {
            encoding,
            reason: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Ok(out)
}

/// A streaming encoder: feed it chunks, take what it has produced, flush it when the source
/// stalls (so a slow stream reaches the client piece by piece), finish at the end.
pub struct StreamEncoder {
    inner: Inner,
}

enum Inner {
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Gzip(GzEncoder<Vec<u8>>),
    Identity(Vec<u8>),
}

impl fmt::Debug for StreamEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let coding = match self.inner {
            Inner::Brotli(_) => "br",
            Inner::Gzip(_) => "gzip",
            Inner::Identity(_) => "identity",
        };
        f.debug_struct("StreamEncoder")
            .field("encoding", &coding)
            .finish()
    }
}

impl StreamEncoder {
    /// An encoder for `encoding` at the configured level.
    pub fn new(encoding: Encoding, config: &CompressionConfig) -> Self {
        StreamEncoder::with_size_hint(encoding, config, None)
    }

    /// An encoder for a body of `size` bytes when it is known: brotli's window then shrinks
    /// to fit the body (same output ratio, far less memory to set up for a small body).
    pub fn with_size_hint(
        encoding: Encoding,
        config: &CompressionConfig,
        size: Option<u64>,
    ) -> Self {
        let mut window = config.brotli_window.clamp(10, 24);
        if let Some(size) = size {
            // The smallest window (at least 2^10) that holds the whole body: a window of
            // 2^w holds 2^w - 16 bytes.
            let needed = size.saturating_add(16);
            let fits = (u64::BITS - (needed - 1).leading_zeros()).clamp(10, 24);
            window = window.min(fits);
        }
        let inner = match encoding {
            Encoding::Brotli => Inner::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                BROTLI_BUFFER,
                config.brotli_quality.min(11),
                window,
            ))),
            Encoding::Gzip => Inner::Gzip(GzEncoder::new(
                Vec::new(),
                Compression::new(config.gzip_level.min(9)),
            )),
            Encoding::Identity => Inner::Identity(Vec::new()),
        };
        StreamEncoder { inner }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match &mut self.inner {
            Inner::Brotli(writer) => writer.get_mut(),
            Inner::Gzip(writer) => writer.get_mut(),
            Inner::Identity(buffer) => buffer,
        }
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(self.output()))
    }

    /// Feeds a chunk; returns the compressed bytes ready so far (often none).
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        match &mut self.inner {
            Inner::Brotli(writer) => writer.write_all(chunk)?,
            Inner::Gzip(writer) => writer.write_all(chunk)?,
            Inner::Identity(buffer) => buffer.extend_from_slice(chunk),
        }
        Ok(self.take())
    }

    /// Emits everything fed so far in a form the client can decode now (a sync flush),
    /// without ending the stream.
    pub fn flush(&mut self) -> io::Result<Bytes> {
        match &mut self.inner {
            Inner::Brotli(writer) => writer.flush()?,
            Inner::Gzip(writer) => writer.flush()?,
            Inner::Identity(_) => {}
        }
        Ok(self.take())
    }

    /// Ends the stream; returns the last bytes.
    pub fn finish(self) -> io::Result<Bytes> {
        let out = match self.inner {
            Inner::Brotli(writer) => writer.into_inner(),
            Inner::Gzip(writer) => writer.finish()?,
            Inner::Identity(buffer) => buffer,
        };
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_json(messages: usize) -> Vec<u8> {
        let items: Vec<String> = (0..messages)
            .map(|i| {
                format!(
                    r#"{{"id":{i},"role":"assistant","content":"Here is the answer to question {i}: the order ships tomorrow."}}"#
                )
            })
            .collect();
        format!("[{}]", items.join(",")).into_bytes()
    }

    #[test]
    fn both_codings_round_trip_and_shrink_json() {
        let config = CompressionConfig::default();
        let body = chat_json(500);
        for encoding in [Encoding::Brotli, Encoding::Gzip, Encoding::Identity] {
            let packed = compress(&body, encoding, &config).unwrap();
            assert_eq!(decompress(&packed, encoding, body.len()).unwrap(), body);
            if encoding != Encoding::Identity {
                assert!(
                    packed.len() * 4 < body.len(),
                    "{encoding}: {}",
                    packed.len()
                );
            }
        }
    }

    #[test]
    fn a_window_sized_to_the_body_round_trips_at_every_boundary() {
        let config = CompressionConfig::default();
        let json = chat_json(2_000);
        for size in [1, 1023, 1024, 1025, 4096, 65_537, json.len()] {
            let body = &json[..size.min(json.len())];
            let packed = compress(body, Encoding::Brotli, &config).unwrap();
            assert_eq!(
                decompress(&packed, Encoding::Brotli, 1 << 20).unwrap(),
                body,
                "{size}"
            );
        }
    }

    #[test]
    fn a_flushed_stream_decodes_up_to_the_flush() {
        let config = CompressionConfig::default();
        for encoding in [Encoding::Brotli, Encoding::Gzip] {
            let mut encoder = StreamEncoder::new(encoding, &config);
            let mut sent = encoder.write(b"data: first event\n\n").unwrap().to_vec();
            sent.extend_from_slice(&encoder.flush().unwrap());
            // What was sent so far decodes to the first event, though the stream goes on.
            let mut partial = Vec::new();
            {
                let mut reader: Box<dyn Read> = match encoding {
                    Encoding::Brotli => Box::new(brotli::Decompressor::new(&sent[..], 4096)),
                    _ => Box::new(flate2::read::GzDecoder::new(&sent[..])),
                };
                let mut buffer = [0u8; 64];
                while let Ok(n) = reader.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    partial.extend_from_slice(&buffer[..n]);
                    if partial.len() >= 19 {
                        break;
                    }
                }
            }
            assert_eq!(partial, b"data: first event\n\n", "{encoding}");
            sent.extend_from_slice(&encoder.write(b"data: second\n\n").unwrap());
            sent.extend_from_slice(&encoder.finish().unwrap());
            assert_eq!(
                decompress(&sent, encoding, 1 << 20).unwrap(),
                b"data: first event\n\ndata: second\n\n"
            );
        }
    }

    #[test]
    fn bombs_and_garbage_are_refused_without_a_panic() {
        let config = CompressionConfig::default();
        let zeros = vec![0u8; 10 << 20];
        for encoding in [Encoding::Brotli, Encoding::Gzip] {
            let bomb = compress(&zeros, encoding, &config).unwrap();
            assert!(bomb.len() < 64 << 10);
            let error = decompress(&bomb, encoding, 1 << 20).unwrap_err();
            assert_eq!(error.status(), 413, "{error}");
            let error = decompress(b"not compressed at all", encoding, 1 << 20).unwrap_err();
            assert_eq!(error.status(), 400, "{error}");
            let truncated = &compress(&chat_json(50), encoding, &config).unwrap()[..40];
            assert!(decompress(truncated, encoding, 1 << 20).is_err());
        }
    }
}
