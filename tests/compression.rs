//! HTTP compression with real clients: each test serves an axum router behind
//! [`CompressionLayer`] on a loopback port and calls it with curl, reqwest (decoding and raw)
//! and headless Chromium. A recorder outside the layer notes what the server really sent, so
//! a client that decodes transparently still proves the bytes on the wire were compressed.
//!
//! curl and Chromium are skipped loudly when missing, or fail the test with
//! `PUPKIT_REQUIRE_SERVICES=1` (`.ci/run` installs both).
#![cfg(feature = "axum")]

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pupkit::compression::{CompressionConfig, CompressionLayer, Encoding, NoCompression};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Messages in `/json`.
const MESSAGES: usize = 400;
/// Chunks of `/stream` and `/gated`.
const CHUNKS: usize = 5;

/// A ~60 KB JSON list of chat messages (with some non-ASCII text, so the browser's decoding
/// of UTF-8 is checked too).
fn chat_json() -> Vec<u8> {
    let messages: Vec<Value> = (0..MESSAGES)
        .map(|i| {
            json!({
                "id": i,
                "role": if i % 2 == 0 { "user" } else { "assistant" },
                "author": format!("user-{}", i % 7),
                "content": format!(
                    "Message {i}: order #{} ships on day {} from the café ☕ warehouse {}.",
                    10_000 + i * 37,
                    i % 28 + 1,
                    ["north", "south", "east", "west"][i % 4]
                ),
            })
        })
        .collect();
    let body = serde_json::to_vec(&messages).expect("serialize the fixture");
    assert!((50_000..70_000).contains(&body.len()), "{}", body.len());
    body
}

/// What the page's script writes into `<pre id="out">`, computed here from the same JSON.
fn expected_summary() -> String {
    let messages: Vec<Value> = serde_json::from_slice(&chat_json()).expect("fixture");
    let ids: u64 = messages.iter().map(|m| m["id"].as_u64().unwrap_or(0)).sum();
    let chars: usize = messages
        .iter()
        .map(|m| m["content"].as_str().unwrap_or("").encode_utf16().count())
        .sum();
    let first = messages[0]["content"].as_str().unwrap_or("");
    format!(
        "count={} ids={ids} chars={chars} first={first}",
        messages.len()
    )
}

/// Exactly 200 bytes of JSON: below the 1 KiB minimum.
fn small_json() -> Vec<u8> {
    let head = r#"{"ok":true,"pad":""#;
    let tail = r#""}"#;
    let pad = "x".repeat(200 - head.len() - tail.len());
    let body = format!("{head}{pad}{tail}").into_bytes();
    assert_eq!(body.len(), 200);
    body
}

/// A page whose script fetches `/json` and writes what it computed from the decoded list.
fn page_html() -> Vec<u8> {
    // A paragraph of filler keeps the page well above the 1 KiB minimum.
    let filler = "<p>Compressed responses, decoded by a real browser.</p>\n".repeat(40);
    format!(
        r#"<!doctype html>
<html>
<head><meta charset="utf-8"><title>loading</title></head>
<body>
<pre id="out">pending</pre>
{filler}
<script>
fetch('/json')
  .then((response) => response.json())
  .then((list) => {{
    const ids = list.reduce((sum, m) => sum + m.id, 0);
    const chars = list.reduce((sum, m) => sum + m.content.length, 0);
    const text = 'count=' + list.length + ' ids=' + ids + ' chars=' + chars +
      ' first=' + list[0].content;
    document.getElementById('out').textContent = text;
    document.title = 'decoded ' + list.length;
  }})
  .catch((error) => {{
    document.getElementById('out').textContent = 'error: ' + error;
  }});
</script>
</body>
</html>
"#
    )
    .into_bytes()
}

/// 4 KiB that look like a PNG: the signature, then noise.
fn png_bytes() -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    let mut state: u32 = 0x1234_5678;
    while bytes.len() < 4096 {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        bytes.push((state >> 24) as u8);
    }
    bytes
}

/// Chunk `i` of `/stream` and `/gated`.
fn stream_chunk(i: usize) -> Bytes {
    Bytes::from(format!(
        "chunk {i}: {}\n",
        "the quick brown fox jumps over the lazy dog ".repeat(8)
    ))
}

/// Everything `/stream` and `/gated` send.
fn stream_body() -> Vec<u8> {
    (0..CHUNKS).flat_map(|i| stream_chunk(i).to_vec()).collect()
}

fn json_type() -> [(header::HeaderName, &'static str); 1] {
    [(header::CONTENT_TYPE, "application/json")]
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The server

/// One request as the recorder (outside the compression layer) saw it.
#[derive(Clone, Debug)]
struct Exchange {
    method: String,
    path: String,
    accept_encoding: Option<String>,
    status: u16,
    content_encoding: Option<String>,
}

type Seen = Arc<Mutex<Vec<Exchange>>>;

async fn record(State(seen): State<Seen>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let accept_encoding = request
        .headers()
        .get(header::ACCEPT_ENCODING)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let response = next.run(request).await;
    let content_encoding = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    seen.lock().expect("recorder lock").push(Exchange {
        method,
        path,
        accept_encoding,
        status: response.status().as_u16(),
        content_encoding,
    });
    response
}

struct Server {
    base: String,
    seen: Seen,
    /// Requests that reached the `/upload` handler.
    uploads: Arc<AtomicUsize>,
    /// Permits for `/gated` to produce its next chunk.
    gate: Arc<Semaphore>,
}

impl Server {
    async fn start(config: CompressionConfig) -> Server {
        let seen = Seen::default();
        let uploads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let upload_count = uploads.clone();
        let stream_gate = gate.clone();
        let router = Router::new()
            .route("/json", get(|| async { (json_type(), chat_json()) }))
            .route("/small.json", get(|| async { (json_type(), small_json()) }))
            .route(
                "/page.html",
                get(|| async {
                    (
                        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                        page_html(),
                    )
                }),
            )
            .route(
                "/image.png",
                get(|| async { ([(header::CONTENT_TYPE, "image/png")], png_bytes()) }),
            )
            .route("/stream", get(timed_stream))
            .route("/gated", get(move || gated_stream(stream_gate.clone())))
            .route(
                "/optout",
                get(|| async { (axum::Extension(NoCompression), json_type(), chat_json()) }),
            )
            .route(
                "/optout-extension",
                get(move || async move {
                    let mut response = (json_type(), chat_json()).into_response();
                    response.extensions_mut().insert(NoCompression);
                    response
                }),
            )
            .route(
                "/no-transform",
                get(move || async move {
                    (
                        [
                            (header::CONTENT_TYPE, "application/json"),
                            (header::CACHE_CONTROL, "private, no-transform"),
                        ],
                        chat_json(),
                    )
                }),
            )
            .route(
                "/upload",
                post(move |headers: HeaderMap, body: Bytes| async move {
                    upload_count.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({
                        "len": body.len(),
                        "sha256": sha256_hex(&body),
                        "content_encoding": headers
                            .get(header::CONTENT_ENCODING)
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    }))
                }),
            )
            // The limit must come from the compression layer, not from axum's 2 MB default.
            .layer(DefaultBodyLimit::disable())
            .layer(CompressionLayer::new(config))
            .layer(middleware::from_fn_with_state(seen.clone(), record));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        Server {
            base: format!("http://{addr}"),
            seen,
            uploads,
            gate,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The last exchange for `method path`.
    fn last(&self, method: &str, path: &str) -> Exchange {
        self.seen
            .lock()
            .expect("recorder lock")
            .iter()
            .rev()
            .find(|e| e.method == method && e.path == path)
            .cloned()
            .unwrap_or_else(|| panic!("the server saw no {method} {path}"))
    }
}

/// `text/plain` of unknown length: a chunk every 50 ms.
async fn timed_stream() -> impl IntoResponse {
    let chunks = futures_util::stream::unfold(0, |i| async move {
        if i == CHUNKS {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        Some((Ok::<_, std::io::Error>(stream_chunk(i)), i + 1))
    });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(chunks),
    )
}

/// Like `/stream`, but each chunk after the first waits for a permit the test gives once it
/// has decoded the previous one: the response can only complete if the layer flushes.
async fn gated_stream(gate: Arc<Semaphore>) -> impl IntoResponse {
    let chunks = futures_util::stream::unfold(0, move |i| {
        let gate = gate.clone();
        async move {
            if i == CHUNKS {
                return None;
            }
            if i > 0 {
                gate.acquire().await.ok()?.forget();
            }
            Some((Ok::<_, std::io::Error>(stream_chunk(i)), i + 1))
        }
    });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(chunks),
    )
}

/// Every GET route with its body, and whether the default config compresses it.
fn get_routes() -> Vec<(&'static str, Vec<u8>, bool)> {
    vec![
        ("/json", chat_json(), true),
        ("/page.html", page_html(), true),
        ("/stream", stream_body(), true),
        ("/image.png", png_bytes(), false),
        ("/small.json", small_json(), false),
        ("/optout", chat_json(), false),
        ("/optout-extension", chat_json(), false),
        ("/no-transform", chat_json(), false),
    ]
}

// ---------------------------------------------------------------------------------------------
// Decoding, independent of the crate's own decoders

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

fn unbrotli(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::Decompressor::new(bytes, 4096)
        .read_to_end(&mut out)
        .expect("valid brotli");
    out
}

/// Decodes a body by its `Content-Encoding`.
fn decode(bytes: &[u8], content_encoding: Option<&str>) -> Vec<u8> {
    match content_encoding {
        None => bytes.to_vec(),
        Some("gzip") => gunzip(bytes),
        Some("br") => unbrotli(bytes),
        Some(other) => panic!("unexpected content-encoding {other:?}"),
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

fn brotli_compress(bytes: &[u8]) -> Vec<u8> {
    let mut writer = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
    writer.write_all(bytes).expect("brotli into memory");
    writer.into_inner()
}

/// A client that neither asks for nor decodes any coding by itself.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_gzip()
        .no_brotli()
        .build()
        .expect("reqwest client")
}

fn header_str<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn has_vary_accept_encoding(values: impl IntoIterator<Item = String>) -> bool {
    values.into_iter().any(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding"))
    })
}

// ---------------------------------------------------------------------------------------------
// curl

/// A unique scratch directory under the system's temp dir.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(support::unique_prefix(test));
    std::fs::create_dir_all(&dir).expect("create a scratch dir");
    dir
}

/// Whether curl runs here; skips loudly (or fails) when it does not.
async fn curl_available() -> bool {
    match tokio::process::Command::new("curl")
        .arg("--version")
        .output()
        .await
    {
        Ok(output) if output.status.success() => true,
        Ok(output) => {
            support::unavailable(
                "curl",
                &format!("`curl --version` exited {}", output.status),
            );
            false
        }
        Err(error) => {
            support::unavailable("curl", &format!("cannot run curl: {error}"));
            false
        }
    }
}

async fn curl(args: &[&str]) -> Output {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .await
        .expect("run curl");
    assert!(
        output.status.success(),
        "curl {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The status and headers (lowercased names) of a `curl -D` dump.
fn parse_dump(dump: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = dump.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {dump:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

fn values(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .collect()
}

#[tokio::test]
async fn curl_compressed_decodes_every_route_to_the_original() {
    if !curl_available().await {
        return;
    }
    let server = Server::start(CompressionConfig::default()).await;
    for (path, original, compressed) in get_routes() {
        let output = curl(&["--compressed", &server.url(path)]).await;
        assert_eq!(output.stdout.len(), original.len(), "{path}");
        assert!(output.stdout == original, "{path}: decoded bytes differ");
        let sent = server.last("GET", path).content_encoding;
        assert_eq!(sent.is_some(), compressed, "{path}: server sent {sent:?}");
    }
}

#[tokio::test]
async fn curl_sees_the_negotiated_headers() {
    if !curl_available().await {
        return;
    }
    let server = Server::start(CompressionConfig::default()).await;
    let dir = scratch("curlheaders");
    for coding in ["br", "gzip"] {
        for (path, original, compressed) in get_routes() {
            let dump = dir.join("headers");
            let body = dir.join("body");
            curl(&[
                "-D",
                path_str(&dump),
                "-o",
                path_str(&body),
                "-H",
                &format!("Accept-Encoding: {coding}"),
                &server.url(path),
            ])
            .await;
            let dump = std::fs::read_to_string(&dump).expect("read the header dump");
            let (status, headers) = parse_dump(&dump);
            let context = format!("{path} with Accept-Encoding: {coding}\n{dump}");
            assert_eq!(status, 200, "{context}");
            let encoding = values(&headers, "content-encoding");
            let length = values(&headers, "content-length");
            if compressed {
                assert_eq!(encoding, [coding], "{context}");
                assert!(
                    length.is_empty(),
                    "Content-Length on a compressed body: {context}"
                );
            } else {
                assert!(encoding.is_empty(), "{context}");
            }
            assert!(
                has_vary_accept_encoding(values(&headers, "vary")),
                "no Vary: Accept-Encoding: {context}"
            );
            let raw = std::fs::read(&body).expect("read the body");
            if compressed {
                assert!(raw.len() < original.len(), "{context}: {} bytes", raw.len());
            }
            let decoded = decode(&raw, encoding.first().map(String::as_str));
            assert!(decoded == original, "{context}: decoded bytes differ");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

// ---------------------------------------------------------------------------------------------
// reqwest

#[tokio::test]
async fn reqwest_decodes_gzip_and_brotli_to_the_original() {
    let server = Server::start(CompressionConfig::default()).await;
    let clients = [
        ("gzip", reqwest::Client::builder().gzip(true).brotli(false)),
        ("br", reqwest::Client::builder().gzip(false).brotli(true)),
        // Both offered: the server prefers brotli.
        ("br", reqwest::Client::builder().gzip(true).brotli(true)),
    ];
    for (expected, builder) in clients {
        let client = builder.build().expect("reqwest client");
        for (path, original, compressed) in get_routes() {
            let response = client.get(server.url(path)).send().await.expect("GET");
            assert_eq!(response.status(), 200, "{path}");
            let body = response.bytes().await.expect("body");
            assert!(
                body == original,
                "{path} via {expected}: decoded bytes differ"
            );
            let sent = server.last("GET", path).content_encoding;
            let want = compressed.then(|| expected.to_owned());
            assert_eq!(sent, want, "{path}: what the server sent");
        }
    }
}

#[tokio::test]
async fn a_raw_client_sees_the_coding_and_fewer_bytes() {
    let server = Server::start(CompressionConfig::default()).await;
    let client = raw_client();
    let original = chat_json();
    for (coding, decoder) in [("br", unbrotli as fn(&[u8]) -> Vec<u8>), ("gzip", gunzip)] {
        let response = client
            .get(server.url("/json"))
            .header(header::ACCEPT_ENCODING, coding)
            .send()
            .await
            .expect("GET /json");
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(header_str(&headers, "content-encoding"), Some(coding));
        assert_eq!(header_str(&headers, "content-length"), None);
        let vary = headers
            .get_all(header::VARY)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        assert!(has_vary_accept_encoding(vary), "{headers:?}");
        let body = response.bytes().await.expect("body");
        assert!(
            body.len() * 4 < original.len(),
            "{coding}: {} of {} bytes",
            body.len(),
            original.len()
        );
        assert!(decoder(&body) == original, "{coding}: decoded bytes differ");
    }
    // No Accept-Encoding at all: identity, with its length.
    let response = client.get(server.url("/json")).send().await.expect("GET");
    assert_eq!(header_str(response.headers(), "content-encoding"), None);
    assert_eq!(
        header_str(response.headers(), "content-length"),
        Some(original.len().to_string().as_str())
    );
    assert!(response.bytes().await.expect("body") == original);
    // HEAD: no body, so no coding.
    let response = client
        .head(server.url("/json"))
        .header(header::ACCEPT_ENCODING, "br, gzip")
        .send()
        .await
        .expect("HEAD");
    assert_eq!(response.status(), 200);
    assert_eq!(header_str(response.headers(), "content-encoding"), None);
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// Decodes a compressed stream as its bytes arrive.
enum Incremental {
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

impl Incremental {
    fn new(coding: &str) -> Incremental {
        match coding {
            "gzip" => Incremental::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
            _ => Incremental::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))),
        }
    }

    /// Feeds compressed bytes; returns everything decoded so far.
    fn feed(&mut self, bytes: &[u8]) -> &[u8] {
        match self {
            Incremental::Gzip(decoder) => {
                decoder.write_all(bytes).expect("valid gzip");
                decoder.flush().expect("valid gzip");
                decoder.get_ref()
            }
            Incremental::Brotli(decoder) => {
                decoder.write_all(bytes).expect("valid brotli");
                decoder.flush().expect("valid brotli");
                decoder.get_ref()
            }
        }
    }
}

#[tokio::test]
async fn a_slow_stream_is_decodable_piece_by_piece() {
    let server = Server::start(CompressionConfig::default()).await;
    let client = raw_client();
    for coding in ["gzip", "br"] {
        let mut response = client
            .get(server.url("/gated"))
            .header(header::ACCEPT_ENCODING, coding)
            .send()
            .await
            .expect("GET /gated");
        assert_eq!(
            header_str(response.headers(), "content-encoding"),
            Some(coding)
        );
        let mut decoder = Incremental::new(coding);
        let mut frames = 0;
        for i in 0..CHUNKS {
            // Chunk i+1 is not produced until chunk i has been decoded here, so each wait
            // ends only if the layer flushed when the body went pending.
            let want: Vec<u8> = (0..=i).flat_map(|j| stream_chunk(j).to_vec()).collect();
            let mut decoded_len = 0;
            while decoded_len < want.len() {
                let frame = tokio::time::timeout(Duration::from_secs(20), response.chunk())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "{coding}: chunk {i} never became decodable while the server \
                             waited (decoded {decoded_len} of {} bytes): no flush on pending",
                            want.len()
                        )
                    })
                    .expect("read the body");
                let Some(frame) = frame else {
                    panic!("{coding}: the body ended before chunk {i}");
                };
                frames += 1;
                let decoded = decoder.feed(&frame);
                assert!(
                    want.starts_with(decoded) || decoded.starts_with(&want),
                    "{coding}: decoded bytes differ at chunk {i}"
                );
                decoded_len = decoded.len();
            }
            assert_eq!(
                decoded_len,
                want.len(),
                "{coding}: more than chunk {i} arrived"
            );
            if i + 1 < CHUNKS {
                server.gate.add_permits(1);
            }
        }
        while let Some(frame) = response.chunk().await.expect("read the body") {
            frames += 1;
            decoder.feed(&frame);
        }
        let decoded = decoder.feed(&[]).to_vec();
        assert!(decoded == stream_body(), "{coding}: decoded bytes differ");
        assert!(frames >= CHUNKS, "{coding}: only {frames} frames");
    }
}

// ---------------------------------------------------------------------------------------------
// Chromium

/// Loads `/page.html` in headless Chromium with the server forcing `coding`, and checks the
/// DOM shows what the script computed from the decoded JSON.
async fn chromium_decodes(coding: Encoding) {
    let Some(binary) = support::browser::chromium().await else {
        return;
    };
    let mut config = CompressionConfig::default();
    config.preference = vec![coding];
    let server = Server::start(config).await;
    let run = support::browser::headless(
        &binary,
        &server.url("/page.html"),
        5_000,
        &["--dump-dom".to_owned()],
    )
    .await;
    let dom = &run.stdout;
    let context = format!("Chromium with {coding}:\n{}", run.context());
    assert!(run.success, "{context}");
    let expected = format!("<pre id=\"out\">{}</pre>", expected_summary());
    assert!(dom.contains(&expected), "want {expected}\n{context}");
    assert!(
        dom.contains(&format!("<title>decoded {MESSAGES}</title>")),
        "{context}"
    );
    for path in ["/page.html", "/json"] {
        let exchange = server.last("GET", path);
        let offered = exchange.accept_encoding.clone().unwrap_or_default();
        assert!(
            offered.split(',').any(|t| t.trim() == coding.as_str()),
            "Chromium did not offer {coding} for {path}: {exchange:?}"
        );
        assert_eq!(exchange.status, 200, "{exchange:?}");
        assert_eq!(
            exchange.content_encoding.as_deref(),
            Some(coding.as_str()),
            "{exchange:?}"
        );
    }
}

#[tokio::test]
async fn chromium_decodes_brotli() {
    chromium_decodes(Encoding::Brotli).await;
}

#[tokio::test]
async fn chromium_decodes_gzip() {
    chromium_decodes(Encoding::Gzip).await;
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[tokio::test]
async fn malformed_accept_encoding_is_treated_leniently() {
    let server = Server::start(CompressionConfig::default()).await;
    let client = raw_client();
    let original = chat_json();
    let long = "gzip;q=0.5, ".repeat(2_000);
    let cases: [&[u8]; 6] = [
        b"br;q=abc,,;;",
        b",,;;==",
        long.as_bytes(),
        "br\u{e9}, gzip\u{2603}".as_bytes(),
        b"\xff\xfe, gzip;q=\xff",
        b"br;q=2, gzip;q=-1",
    ];
    for value in cases {
        let shown = String::from_utf8_lossy(&value[..value.len().min(40)]).into_owned();
        let response = client
            .get(server.url("/json"))
            .header(
                header::ACCEPT_ENCODING,
                HeaderValue::from_bytes(value).expect("a legal header value"),
            )
            .send()
            .await
            .expect("GET /json");
        assert_eq!(response.status(), 200, "Accept-Encoding {shown:?}");
        let coding = header_str(response.headers(), "content-encoding").map(str::to_owned);
        let body = response.bytes().await.expect("body");
        assert!(
            decode(&body, coding.as_deref()) == original,
            "Accept-Encoding {shown:?}: decoded bytes differ"
        );
    }
}

/// POSTs `body` to `/upload` with a `Content-Encoding`; returns the status and the JSON reply.
async fn upload(server: &Server, coding: &str, body: Vec<u8>) -> (u16, Option<Value>) {
    let response = raw_client()
        .post(server.url("/upload"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_ENCODING, coding)
        .body(body)
        .send()
        .await
        .expect("POST /upload");
    let status = response.status().as_u16();
    let text = response.text().await.expect("reply body");
    (status, serde_json::from_str(&text).ok())
}

#[tokio::test]
async fn request_bodies_are_decoded_before_the_handler() {
    let server = Server::start(CompressionConfig::default()).await;
    let original = chat_json();
    // About 3 MB decoded: above axum's default 2 MB, below the layer's 8 MiB.
    let large: Vec<u8> = original.repeat(48);
    for (coding, packed, plain) in [
        ("br", brotli_compress(&original), &original),
        ("gzip", gzip(&original), &original),
        ("br", brotli_compress(&large), &large),
        ("gzip", gzip(&large), &large),
    ] {
        let (status, reply) = upload(&server, coding, packed).await;
        assert_eq!(status, 200, "{coding}: {reply:?}");
        let reply = reply.expect("a JSON reply");
        assert_eq!(reply["len"], plain.len(), "{coding}");
        assert_eq!(reply["sha256"], sha256_hex(plain), "{coding}");
        assert_eq!(
            reply["content_encoding"],
            Value::Null,
            "{coding}: the handler still sees Content-Encoding"
        );
    }
}

#[tokio::test]
async fn corrupt_and_unknown_request_codings_are_refused() {
    let server = Server::start(CompressionConfig::default()).await;
    let packed = gzip(&chat_json());
    let cases = [
        ("gzip", b"this is not gzip at all".to_vec(), 400),
        ("gzip", packed[..packed.len() / 2].to_vec(), 400),
        ("br", b"\xff\xff\xff\xff not brotli".to_vec(), 400),
        ("zstd", packed.clone(), 415),
    ];
    for (coding, body, want) in cases {
        let (status, reply) = upload(&server, coding, body).await;
        assert_eq!(status, want, "Content-Encoding {coding:?}: {reply:?}");
    }
    assert_eq!(server.uploads.load(Ordering::SeqCst), 0, "a handler ran");
    // The server is still up.
    let (status, _) = upload(&server, "gzip", packed).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_zip_bomb_gets_413_and_the_server_stays_up() {
    let server = Server::start(CompressionConfig::default()).await;
    // 64 MiB of zeros, small on the wire.
    let zeros = vec![0u8; 64 << 20];
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&zeros).expect("gzip into memory");
    let gzip_bomb = encoder.finish().expect("gzip into memory");
    let mut writer = brotli::CompressorWriter::new(Vec::new(), 4096, 1, 22);
    writer.write_all(&zeros).expect("brotli into memory");
    let brotli_bomb = writer.into_inner();
    drop(zeros);
    for (coding, bomb) in [("gzip", gzip_bomb), ("br", brotli_bomb)] {
        assert!(bomb.len() < 256 << 10, "{coding}: {} bytes", bomb.len());
        let (status, reply) = upload(&server, coding, bomb).await;
        assert_eq!(status, 413, "{coding} bomb: {reply:?}");
    }
    assert_eq!(server.uploads.load(Ordering::SeqCst), 0, "a handler ran");
    let (status, reply) = upload(&server, "br", brotli_compress(b"{\"after\":\"the bomb\"}")).await;
    assert_eq!(status, 200, "{reply:?}");
    let response = raw_client()
        .get(server.url("/json"))
        .send()
        .await
        .expect("GET after the bombs");
    assert_eq!(response.status(), 200);
}
