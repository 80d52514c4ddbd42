//! HTTP compression for a host's own server: Accept-Encoding negotiation (RFC 9110), a
//! content-type and size policy, brotli and gzip encoders for whole bodies and streams, and
//! request decompression with a limit on the decoded size. With the feature `axum`,
//! [`CompressionLayer`] does all of it for any tower/axum/hyper service in one line.
//!
//! The functions here are framework-agnostic: [`negotiate`], [`skip_reason`],
//! [`compress`], [`StreamEncoder`], [`decompress`].

mod encoder;
#[cfg(feature = "axum")]
mod layer;
mod negotiate;
mod policy;

pub use encoder::{DecodeError, StreamEncoder, compress, decompress};
#[cfg(feature = "axum")]
pub use layer::{CompressedBody, CompressionLayer, CompressionService, NoCompression, RequestBody};
pub use negotiate::{Encoding, Negotiated, negotiate};
pub use policy::{CompressionConfig, ResponseFacts, Skip, is_compressible, skip_reason};
