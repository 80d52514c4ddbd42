//! The tower layer (feature `axum`): decodes compressed request bodies, negotiates and
//! compresses responses, streaming, for any tower/axum/hyper service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    ETAG, HeaderValue, VARY,
};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::encoder::{DecodeError, StreamEncoder, decompress};
use super::negotiate::{Encoding, Negotiated, negotiate};
use super::policy::{CompressionConfig, ResponseFacts, skip_reason};
use crate::error::BoxError;

/// Put this in a response's extensions to send it uncompressed: for responses that mix a
/// secret with text an attacker controls (BREACH).
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use axum::Extension;
/// use pupkit::compression::NoCompression;
///
/// async fn account_page() -> (Extension<NoCompression>, &'static str) {
///     (Extension(NoCompression), "<html>csrf token and echoed query</html>")
/// }
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoCompression;

/// Compression for a tower service in one line:
/// `Router::new().route(...).layer(CompressionLayer::new(CompressionConfig::default()))`.
///
/// - Responses: coding negotiated from `Accept-Encoding` (brotli, then gzip), only for
///   compressible types over `min_size`, never for HEAD, 204, 304, 206, already-encoded or
///   `no-transform` responses, nor for ones carrying [`NoCompression`]. `Vary:
///   Accept-Encoding` is always added; a compressed response loses `Content-Length` and
///   `Accept-Ranges`, and a strong `ETag` becomes weak. Bodies stream: whenever the inner
///   body has nothing ready, what was compressed so far is flushed to the client.
/// - Requests: a body with `Content-Encoding: br` or `gzip` is read whole and decoded before
///   the inner service sees it (the header removed), so a request holds at most
///   `max_decoded_request` bytes compressed plus as many decoded. Over that limit (declared
///   or read) it gets 413, corrupt 400, an unknown or stacked coding (`gzip, br`) 415.
#[derive(Clone, Debug, Default)]
pub struct CompressionLayer {
    config: Arc<CompressionConfig>,
}

impl CompressionLayer {
    /// A layer with `config`.
    pub fn new(config: CompressionConfig) -> Self {
        CompressionLayer {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for CompressionLayer {
    type Service = CompressionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CompressionService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`CompressionLayer`] wraps around another.
#[derive(Clone, Debug)]
pub struct CompressionService<S> {
    inner: S,
    config: Arc<CompressionConfig>,
}

pin_project! {
    /// A request body as the inner service sees it: the original, or the decoded bytes.
    pub struct RequestBody<B> {
        #[pin]
        inner: RequestInner<B>,
    }
}

pin_project! {
    #[project = RequestBodyProj]
    enum RequestInner<B> {
        Original { #[pin] body: B },
        Decoded { data: Option<Bytes> },
    }
}

impl<B> RequestBody<B> {
    fn original(body: B) -> Self {
        RequestBody {
            inner: RequestInner::Original { body },
        }
    }

    fn decoded(data: Bytes) -> Self {
        RequestBody {
            inner: RequestInner::Decoded { data: Some(data) },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().inner.project() {
            RequestBodyProj::Original { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            RequestBodyProj::Decoded { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RequestInner::Original { body } => body.is_end_stream(),
            RequestInner::Decoded { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RequestInner::Original { body } => body.size_hint(),
            RequestInner::Decoded { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

pin_project! {
    /// A response body: passed through, compressed as it streams, or a short error answer.
    pub struct CompressedBody<B> {
        #[pin]
        inner: ResponseInner<B>,
    }
}

pin_project! {
    #[project = CompressedBodyProj]
    enum ResponseInner<B> {
        Identity { #[pin] body: B },
        Encoded {
            #[pin] body: B,
            encoder: Option<StreamEncoder>,
            unflushed: usize,
            trailers: Option<http::HeaderMap>,
        },
        Full { data: Option<Bytes> },
    }
}

impl<B> CompressedBody<B> {
    fn identity(body: B) -> Self {
        CompressedBody {
            inner: ResponseInner::Identity { body },
        }
    }

    fn full(data: Bytes) -> Self {
        CompressedBody {
            inner: ResponseInner::Full { data: Some(data) },
        }
    }

    fn encoded(body: B, encoder: StreamEncoder) -> Self {
        CompressedBody {
            inner: ResponseInner::Encoded {
                body,
                encoder: Some(encoder),
                unflushed: 0,
                trailers: None,
            },
        }
    }
}

impl<B> Body for CompressedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().inner.project() {
            CompressedBodyProj::Identity { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            CompressedBodyProj::Full { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            CompressedBodyProj::Encoded {
                mut body,
                encoder,
                unflushed,
                trailers,
            } => loop {
                let Some(active) = encoder.as_mut() else {
                    // Finished: only trailers may be left.
                    return Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))));
                };
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            *unflushed += data.len();
                            let out = active.write(&data)?;
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        Err(frame) => {
                            if let Ok(more) = frame.into_trailers() {
                                trailers.get_or_insert_with(Default::default).extend(more);
                            }
                        }
                    },
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
                    Poll::Ready(None) => {
                        let last = encoder.take().map(StreamEncoder::finish).transpose()?;
                        match last {
                            Some(out) if !out.is_empty() => {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                            _ => continue,
                        }
                    }
                    Poll::Pending => {
                        // The source stalled: send what it gave so far, decodable now.
                        if *unflushed > 0 {
                            *unflushed = 0;
                            let out = active.flush()?;
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        return Poll::Pending;
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ResponseInner::Identity { body } => body.is_end_stream(),
            ResponseInner::Full { data } => data.is_none(),
            ResponseInner::Encoded {
                encoder, trailers, ..
            } => encoder.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ResponseInner::Identity { body } => body.size_hint(),
            ResponseInner::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseInner::Encoded { .. } => SizeHint::default(),
        }
    }
}

/// A short JSON error answer.
fn refuse<B>(status: u16, message: &str) -> Response<CompressedBody<B>> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(CompressedBody::full(Bytes::from(body)));
    add_vary(response.headers_mut());
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Reads a whole body, failing past `limit` bytes.
async fn collect<B>(body: B, limit: usize) -> Result<Vec<u8>, (u16, String)>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| {
            (
                400,
                format!("could not read the request body: {}", e.into()),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err((413, format!("the request body is over {limit} bytes")));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CompressionService<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<CompressedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone that was made ready serves this call; a fresh clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move {
            let head = request.method() == Method::HEAD;
            // Every Accept-Encoding line counts, as one comma-separated list.
            let lines: Vec<&str> = request
                .headers()
                .get_all(ACCEPT_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let accept = (!lines.is_empty()).then(|| lines.join(","));
            let request = match decode_request(request, &config).await {
                Ok(request) => request,
                Err((status, message)) => return Ok(refuse(status, &message)),
            };
            let response = inner.call(request).await?;
            Ok(encode_response(response, head, accept.as_deref(), &config))
        })
    }
}

/// Decodes a `br` or `gzip` request body (bounded), or passes the request through.
async fn decode_request<B>(
    request: Request<B>,
    config: &CompressionConfig,
) -> Result<Request<RequestBody<B>>, (u16, String)>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    // All lines, as one list: stacked codings (`gzip, br`, or two lines) are not supported.
    let lines: Vec<String> = request
        .headers()
        .get_all(CONTENT_ENCODING)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
        .collect();
    let coding = (!lines.is_empty()).then(|| lines.join(", "));
    let encoding = match coding.as_deref() {
        None | Some("") => None,
        Some(token) => match Encoding::from_token(token) {
            Some(Encoding::Identity) => None,
            Some(encoding) => Some(encoding),
            None => {
                let error = DecodeError::Unsupported {
                    coding: crate::error::excerpt(token),
                };
                return Err((error.status(), error.to_string()));
            }
        },
    };
    let Some(encoding) = encoding else {
        return Ok(request.map(RequestBody::original));
    };
    let (mut parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > config.max_decoded_request as u64) {
        let limit = config.max_decoded_request;
        return Err((413, format!("the request body is over {limit} bytes")));
    }
    let compressed = collect(body, config.max_decoded_request).await?;
    let decoded = decompress(&compressed, encoding, config.max_decoded_request)
        .map_err(|e| (e.status(), e.to_string()))?;
    parts.headers.remove(CONTENT_ENCODING);
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(decoded.len()));
    Ok(Request::from_parts(
        parts,
        RequestBody::decoded(Bytes::from(decoded)),
    ))
}

/// Decides, sets the headers, and wraps the body.
fn encode_response<B>(
    response: Response<B>,
    head: bool,
    accept: Option<&str>,
    config: &CompressionConfig,
) -> Response<CompressedBody<B>>
where
    B: Body<Data = Bytes>,
{
    let (mut parts, body) = response.into_parts();
    add_vary(&mut parts.headers);
    let header = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    // An unreadable Content-Encoding is still an encoding: never compress over it.
    let encoded = parts
        .headers
        .get(CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("unknown"));
    let cache_control: Vec<&str> = parts
        .headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let cache_control = cache_control.join(",");
    let facts = ResponseFacts {
        head,
        status: parts.status.as_u16(),
        content_type: header(CONTENT_TYPE),
        content_encoding: encoded,
        cache_control: Some(cache_control.as_str()).filter(|c| !c.is_empty()),
        size: body.size_hint().exact(),
        opted_out: parts.extensions.get::<NoCompression>().is_some(),
    };
    let skip = skip_reason(&facts, config);
    let encoding = match negotiate(accept, &config.preference) {
        Negotiated::Use(encoding) => encoding,
        Negotiated::NotAcceptable if config.not_acceptable_status && skip.is_none() => {
            return refuse(406, "none of the codings in Accept-Encoding is available");
        }
        Negotiated::NotAcceptable => Encoding::Identity,
    };
    if skip.is_some() || encoding == Encoding::Identity {
        return Response::from_parts(parts, CompressedBody::identity(body));
    }
    parts.headers.insert(
        CONTENT_ENCODING,
        HeaderValue::from_static(encoding.as_str()),
    );
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(ACCEPT_RANGES);
    weaken_etag(&mut parts.headers);
    let encoder = StreamEncoder::with_size_hint(encoding, config, facts_size(&body));
    Response::from_parts(parts, CompressedBody::encoded(body, encoder))
}

/// The body's exact size, when it is known.
fn facts_size<B: Body>(body: &B) -> Option<u64> {
    body.size_hint().exact()
}

/// Adds `Vary: Accept-Encoding` unless it is there (or `Vary: *`).
fn add_vary(headers: &mut http::HeaderMap) {
    let present = headers.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("accept-encoding"))
        })
    });
    if !present {
        headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// A strong validator of the identity representation cannot describe the compressed one
/// (RFC 9110 §8.8.1): make it weak.
fn weaken_etag(headers: &mut http::HeaderMap) {
    if let Some(tag) = headers.get(ETAG).and_then(|v| v.to_str().ok())
        && !tag.starts_with("W/")
        && let Ok(weak) = HeaderValue::from_str(&format!("W/{tag}"))
    {
        headers.insert(ETAG, weak);
    }
}
