//! An axum server with pupkit's compression layer: JSON and HTML compressed (brotli, else
//! gzip), an image left alone, a route that opts out, and compressed uploads decoded.
//!
//! ```sh
//! cargo run --example compression --features axum
//! curl -s --compressed -D - http://127.0.0.1:3001/messages -o /dev/null
//! ```

use axum::Extension;
use axum::Router;
use axum::routing::{get, post};
use pupkit::compression::{CompressionConfig, CompressionLayer, NoCompression};

/// A page of chat messages, about 60 KB of JSON.
async fn messages() -> axum::Json<serde_json::Value> {
    let items: Vec<serde_json::Value> = (0..400)
        .map(|i| {
            serde_json::json!({
                "id": i,
                "role": if i % 2 == 0 { "user" } else { "assistant" },
                "content": format!("Message {i}: could you check the status of order {}?", 1000 + i),
            })
        })
        .collect();
    axum::Json(serde_json::Value::Array(items))
}

/// Mixes a secret with text from the request: sent uncompressed (BREACH).
async fn account() -> (Extension<NoCompression>, &'static str) {
    (
        Extension(NoCompression),
        "csrf-token: 1f2e3d, echoed query: ...",
    )
}

/// Receives an upload, decoded by the layer whatever its Content-Encoding.
async fn upload(body: axum::body::Bytes) -> String {
    format!("received {} bytes after decoding\n", body.len())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let app = Router::new()
        .route("/messages", get(messages))
        .route("/account", get(account))
        .route("/upload", post(upload))
        .layer(CompressionLayer::new(CompressionConfig::default()));
    let addr = std::env::var("PUPKIT_ADDR").unwrap_or_else(|_| "127.0.0.1:3001".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("try:");
    println!("  curl -s --compressed -D - {base}/messages -o /dev/null   # content-encoding: br");
    println!("  curl -s -H 'accept-encoding: gzip' -D - {base}/messages -o /dev/null");
    println!("  curl -s --compressed -D - {base}/account");
    println!(
        "  printf 'hello %.0s' $(seq 1000) | gzip | curl -s -H 'content-encoding: gzip' --data-binary @- {base}/upload"
    );
    axum::serve(listener, app).await
}
