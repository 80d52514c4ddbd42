//! The `Embedder` trait: one API call for a batch of texts. And a local, deterministic
//! embedder for tests, the quickstart and hosts without an API key.

use std::fmt;
use std::hash::{Hash, Hasher};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, excerpt};

/// Most inputs in one request (the API's `maxItems`).
pub const MAX_INPUTS: usize = 2048;
/// Most tokens in one input, for every embedding model.
pub const MAX_INPUT_TOKENS: u32 = 8192;
/// Most tokens summed over one request's inputs.
pub const MAX_REQUEST_TOKENS: u32 = 300_000;

/// One call's worth of texts to embed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EmbedRequest {
    /// The model, such as `text-embedding-3-small`.
    pub model: String,
    /// The texts, in order.
    pub texts: Vec<String>,
    /// Shorter vectors, for models that support them (`text-embedding-3-*`).
    pub dimensions: Option<u32>,
}

impl EmbedRequest {
    /// `texts` for `model`, at the model's default dimensions.
    pub fn new(model: impl Into<String>, texts: Vec<String>) -> Self {
        EmbedRequest {
            model: model.into(),
            texts,
            dimensions: None,
        }
    }

    /// Asks for vectors of `dimensions`.
    pub fn dimensions(mut self, dimensions: u32) -> Self {
        self.dimensions = Some(dimensions);
        self
    }
}

/// What the provider reports as used by one call (the whole request: there is no per-input
/// count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedUsage {
    /// Input tokens.
    pub prompt_tokens: u64,
    /// All tokens (the same as `prompt_tokens` for embeddings).
    pub total_tokens: u64,
}

/// The outcome of one call: per text, in the request's order, its vector or why that text
/// alone failed (an input the API refused, found by bisecting the batch); and the usage.
#[derive(Debug)]
#[non_exhaustive]
pub struct EmbedResponse {
    /// One result per text, in the request's order.
    pub results: Vec<Result<Vec<f32>>>,
    /// What the call used.
    pub usage: EmbedUsage,
}

impl EmbedResponse {
    /// Results and usage.
    pub fn new(results: Vec<Result<Vec<f32>>>, usage: EmbedUsage) -> Self {
        EmbedResponse { results, usage }
    }
}

/// A source of embeddings: one call for a batch of texts.
///
/// [`LocalEmbedder`] is deterministic and free; `OpenAiEmbedder` (feature `openai`) calls
/// the OpenAI API or a compatible server. The [`Batcher`](super::Batcher) merges callers'
/// texts into calls of an `Embedder`.
#[async_trait]
pub trait Embedder: Send + Sync + fmt::Debug {
    /// Embeds the texts of one request. An `Err` fails the whole call; a text the provider
    /// refused alone fails in its own slot of [`EmbedResponse::results`].
    async fn embed(&self, request: &EmbedRequest) -> Result<EmbedResponse>;

    /// A name for metrics and logs (`openai`, `local`, ...).
    fn name(&self) -> &str;
}

/// An estimate of a text's tokens, on the high side for the usual tokenizers (cl100k): a
/// token per 4 bytes of ASCII, a token per other character, and at least one.
///
/// ```
/// assert_eq!(pupkit::embed::estimate_tokens("hello world"), 3);
/// assert_eq!(pupkit::embed::estimate_tokens("日本語"), 3);
/// ```
pub fn estimate_tokens(text: &str) -> u32 {
    let (ascii, other) = text.chars().fold((0u64, 0u64), |(a, o), c| {
        if c.is_ascii() { (a + 1, o) } else { (a, o + 1) }
    });
    (ascii.div_ceil(4) + other).clamp(1, u32::MAX as u64) as u32
}

/// Checks one text against the API's per-input limits: not empty, at most 8,192 tokens
/// (estimated).
pub fn check_text(text: &str) -> Result<u32> {
    if text.is_empty() {
        return Err(Error::invalid(
            "text",
            "is empty; the embeddings API refuses empty input",
        ));
    }
    let tokens = estimate_tokens(text);
    if tokens > MAX_INPUT_TOKENS {
        return Err(Error::invalid(
            "text",
            format!(
                "{:?} is about {tokens} tokens, over the limit of {MAX_INPUT_TOKENS} tokens per input",
                excerpt(text)
            ),
        ));
    }
    Ok(tokens)
}

/// Deterministic embeddings by feature hashing: each word and character trigram of a text
/// adds ±1 to a hashed dimension, and the vector is normalized. Similar texts get similar
/// vectors, but this is **not a language model**: it is for tests, the quickstart, and hosts
/// that run without an API key. It reports its usage as the estimated tokens.
#[derive(Clone, Debug)]
pub struct LocalEmbedder {
    dimensions: u32,
}

impl LocalEmbedder {
    /// Vectors of `dimensions` (at least 1) unless a request asks for others.
    pub fn new(dimensions: u32) -> Self {
        LocalEmbedder {
            dimensions: dimensions.max(1),
        }
    }

    /// The vector of one text.
    pub fn vector(&self, text: &str, dimensions: u32) -> Vec<f32> {
        let dimensions = dimensions.max(1) as usize;
        let mut vector = vec![0f32; dimensions];
        let lower = text.to_lowercase();
        let chars: Vec<char> = lower.chars().collect();
        let features = lower
            .split_whitespace()
            .map(|w| w.to_owned())
            .chain(chars.windows(3).map(|w| w.iter().collect::<String>()));
        for feature in features {
            // A fixed hasher (not RandomState), so vectors are the same in every process.
            let mut hasher = FixedHasher::default();
            feature.hash(&mut hasher);
            let hash = hasher.finish();
            let index = (hash % dimensions as u64) as usize;
            vector[index] += if hash >> 63 == 0 { 1.0 } else { -1.0 };
        }
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            vector.iter_mut().for_each(|x| *x /= norm);
        }
        vector
    }
}

/// FNV-1a: stable across processes and releases, unlike the standard library's hasher.
struct FixedHasher(u64);

impl Default for FixedHasher {
    fn default() -> Self {
        FixedHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for FixedHasher {
    fn finish(&self) -> u64 {
        // A final mix, so nearby inputs spread over the high bit too.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    async fn embed(&self, request: &EmbedRequest) -> Result<EmbedResponse> {
        let dimensions = request.dimensions.unwrap_or(self.dimensions);
        let mut tokens = 0u64;
        let mut results = Vec::with_capacity(request.texts.len());
        for text in &request.texts {
            results.push(check_text(text).map(|estimate| {
                tokens += u64::from(estimate);
                self.vector(text, dimensions)
            }));
        }
        Ok(EmbedResponse {
            results,
            usage: EmbedUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        })
    }

    fn name(&self) -> &str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_vectors_are_deterministic_normalized_and_similar_for_similar_texts() {
        let local = LocalEmbedder::new(256);
        let a = local.vector("the cat sat on the mat", 256);
        assert_eq!(a, local.vector("the cat sat on the mat", 256));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
        let near = local.vector("the cat sat on a mat", 256);
        let far = local.vector("quarterly revenue grew by 12 percent", 256);
        assert!(dot(&a, &near) > dot(&a, &far) + 0.3);
    }

    #[test]
    fn limits_name_the_problem() {
        assert!(check_text("").unwrap_err().to_string().contains("empty"));
        let long = "word ".repeat(8_000);
        let error = check_text(&long).unwrap_err().to_string();
        assert!(error.contains("8192"), "{error}");
        assert_eq!(check_text("hi").unwrap(), 1);
    }
}
