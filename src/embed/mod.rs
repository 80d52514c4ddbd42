//! Embeddings: an [`Embedder`] makes one API call for a batch of texts; the [`Batcher`]
//! merges concurrent callers' texts into such calls, deduplicates them, caches the vectors
//! and records each caller's share of the cost.

mod batcher;
mod embedder;
#[cfg(feature = "openai")]
mod openai;

pub use batcher::{Batcher, BatcherConfig, BatcherStats, Embedding, EmbeddingBatcher};
pub use embedder::{
    EmbedRequest, EmbedResponse, EmbedUsage, Embedder, LocalEmbedder, MAX_INPUT_TOKENS, MAX_INPUTS,
    MAX_REQUEST_TOKENS, check_text, estimate_tokens,
};
#[cfg(feature = "openai")]
pub use openai::{OpenAiConfig, OpenAiEmbedder, RetryConfig};
