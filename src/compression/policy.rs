//! What to compress: the configuration, and the rules on content type, size, method and
//! status.

use serde::{Deserialize, Serialize};

use super::negotiate::Encoding;

/// Settings of compression. The defaults are the report's and the research's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CompressionConfig {
    /// Codings offered, in the server's order of preference (ties in the client's q-values
    /// go to the first). Default brotli, then gzip.
    pub preference: Vec<Encoding>,
    /// Bodies smaller than this (when their size is known) are sent as they are. Default
    /// 1 KiB.
    pub min_size: usize,
    /// Brotli quality for dynamic responses. Default 4 (see ARCHITECTURE.md for the
    /// measurements).
    pub brotli_quality: u32,
    /// Brotli window, log2 bytes. Default 22.
    pub brotli_window: u32,
    /// gzip level. Default 6.
    pub gzip_level: u32,
    /// Compress `text/event-stream` too (flushed whenever the stream pauses). Default false.
    pub compress_event_streams: bool,
    /// The largest decoded request body accepted; a bigger one (a zip bomb) gets 413.
    /// Default 8 MiB.
    pub max_decoded_request: usize,
    /// Answer 406 when the client refuses identity and every offered coding. Default false
    /// (send identity anyway, as RFC 9110 allows).
    pub not_acceptable_status: bool,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            preference: vec![Encoding::Brotli, Encoding::Gzip],
            min_size: 1024,
            brotli_quality: 4,
            brotli_window: 22,
            gzip_level: 6,
            compress_event_streams: false,
            max_decoded_request: 8 << 20,
            not_acceptable_status: false,
        }
    }
}

/// True for media types that compress well: `text/*`, JSON, JavaScript, XML, `+json` and
/// `+xml` types, SVG, WebAssembly, and a few more. Not images, video, audio, fonts already
/// compressed, archives, gRPC, or event streams (unless `event_streams`).
///
/// ```
/// use pupkit::compression::is_compressible;
///
/// assert!(is_compressible("application/json; charset=utf-8", false));
/// assert!(is_compressible("image/svg+xml", false));
/// assert!(!is_compressible("image/png", false));
/// assert!(!is_compressible("text/event-stream", false));
/// ```
pub fn is_compressible(content_type: &str, event_streams: bool) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "text/event-stream" {
        return event_streams;
    }
    if essence.starts_with("text/") {
        return true;
    }
    if essence.ends_with("+json") || essence.ends_with("+xml") {
        return true;
    }
    matches!(
        essence.as_str(),
        "application/json"
            | "application/javascript"
            | "application/x-javascript"
            | "application/ecmascript"
            | "application/xml"
            | "application/xhtml+xml"
            | "application/wasm"
            | "application/x-ndjson"
            | "application/graphql-response+json"
            | "application/manifest+json"
            | "application/rtf"
            | "application/x-sh"
            | "application/csv"
            | "image/svg+xml"
            | "image/x-icon"
            | "image/bmp"
            | "font/ttf"
            | "font/otf"
            | "application/vnd.ms-fontobject"
    )
}

/// Why a response is sent as it is. `None` from [`skip_reason`] means: compress it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Skip {
    /// A HEAD request: no body.
    Head,
    /// 204, 304, 1xx: no body; 206: a range of the identity representation.
    Status,
    /// Already has a `Content-Encoding`.
    AlreadyEncoded,
    /// `Cache-Control: no-transform`.
    NoTransform,
    /// A media type that does not compress (or none given).
    ContentType,
    /// Known to be smaller than `min_size`.
    TooSmall,
    /// The route opted out (BREACH).
    OptedOut,
}

/// The facts about a response the policy looks at, framework-agnostic.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResponseFacts<'a> {
    /// The request method was HEAD.
    pub head: bool,
    /// The status code.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<&'a str>,
    /// `Content-Encoding`, if any.
    pub content_encoding: Option<&'a str>,
    /// `Cache-Control`, if any.
    pub cache_control: Option<&'a str>,
    /// The body's size, when known.
    pub size: Option<u64>,
    /// The route asked not to be compressed.
    pub opted_out: bool,
}

/// Why the response must not be compressed, or `None` when it should be.
pub fn skip_reason(facts: &ResponseFacts<'_>, config: &CompressionConfig) -> Option<Skip> {
    if facts.opted_out {
        return Some(Skip::OptedOut);
    }
    if facts.head {
        return Some(Skip::Head);
    }
    if matches!(facts.status, 100..=199 | 204 | 206 | 304) {
        return Some(Skip::Status);
    }
    if facts
        .content_encoding
        .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"))
    {
        return Some(Skip::AlreadyEncoded);
    }
    if facts.cache_control.is_some_and(|c| {
        c.split(',')
            .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
    }) {
        return Some(Skip::NoTransform);
    }
    if !facts
        .content_type
        .is_some_and(|t| is_compressible(t, config.compress_event_streams))
    {
        return Some(Skip::ContentType);
    }
    if facts.size.is_some_and(|s| s < config.min_size as u64) {
        return Some(Skip::TooSmall);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(size: u64) -> ResponseFacts<'static> {
        ResponseFacts {
            status: 200,
            content_type: Some("application/json"),
            size: Some(size),
            ..Default::default()
        }
    }

    #[test]
    fn the_rules() {
        let config = CompressionConfig::default();
        assert_eq!(skip_reason(&json(5_000), &config), None);
        assert_eq!(skip_reason(&json(100), &config), Some(Skip::TooSmall));
        let unknown_size = ResponseFacts {
            size: None,
            ..json(0)
        };
        assert_eq!(skip_reason(&unknown_size, &config), None);
        for status in [204, 206, 304, 101] {
            let facts = ResponseFacts {
                status,
                ..json(5_000)
            };
            assert_eq!(skip_reason(&facts, &config), Some(Skip::Status), "{status}");
        }
        let head = ResponseFacts {
            head: true,
            ..json(5_000)
        };
        assert_eq!(skip_reason(&head, &config), Some(Skip::Head));
        let encoded = ResponseFacts {
            content_encoding: Some("gzip"),
            ..json(5_000)
        };
        assert_eq!(skip_reason(&encoded, &config), Some(Skip::AlreadyEncoded));
        let no_transform = ResponseFacts {
            cache_control: Some("private, No-Transform"),
            ..json(5_000)
        };
        assert_eq!(skip_reason(&no_transform, &config), Some(Skip::NoTransform));
        for kind in [
            "image/png",
            "video/mp4",
            "application/zip",
            "application/grpc",
            "font/woff2",
        ] {
            let facts = ResponseFacts {
                content_type: Some(kind),
                ..json(5_000)
            };
            assert_eq!(
                skip_reason(&facts, &config),
                Some(Skip::ContentType),
                "{kind}"
            );
        }
        let opted_out = ResponseFacts {
            opted_out: true,
            ..json(5_000)
        };
        assert_eq!(skip_reason(&opted_out, &config), Some(Skip::OptedOut));
    }
}
