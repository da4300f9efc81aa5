//! The live page: `GET /` and the files it loads, all embedded in the binary so that the page
//! works on a machine without internet and contacts no other host (its Content-Security-Policy
//! allows this daemon only).
//!
//! Every asset is served under a name that carries a hash of its contents
//! (`/assets/page.0123456789abcdef.js`), so a browser may keep it for a year without asking
//! again; the HTML, which names the current hashes, is revalidated on every load (`no-cache`,
//! with an `ETag`). The page and its assets hold no data: they are open like `/healthz`, and the
//! page asks for a token when the API wants one.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The page's route.
pub const PAGE_ROUTE: &str = "/";
/// The route of the page's files.
pub const ASSET_ROUTE: &str = "/assets/{file}";

/// Scripts, styles and connections from this daemon only; no frames, no `<base>`, no forms
/// sent anywhere. The favicon is an empty `data:` image (no request at all).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// One embedded file: the stem and extension it is served under (with its hash between them),
/// its content type and bytes.
struct Embedded {
    stem: &'static str,
    ext: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

/// The page's files, in the order the HTML template names them (`{{0}}`, `{{1}}`, ...).
const FILES: [Embedded; 4] = [
    Embedded {
        stem: "uPlot.iife.min",
        ext: "js",
        content_type: JS,
        bytes: include_bytes!("../../assets/vendor/uplot/uPlot.iife.min.js"),
    },
    Embedded {
        stem: "uPlot.min",
        ext: "css",
        content_type: CSS,
        bytes: include_bytes!("../../assets/vendor/uplot/uPlot.min.css"),
    },
    Embedded {
        stem: "page",
        ext: "js",
        content_type: JS,
        bytes: include_bytes!("../../assets/page/page.js"),
    },
    Embedded {
        stem: "page",
        ext: "css",
        content_type: CSS,
        bytes: include_bytes!("../../assets/page/page.css"),
    },
];

const TEMPLATE: &str = include_str!("../../assets/page/index.html");

/// FNV-1a, 64 bits: a content fingerprint for cache busting and `ETag`s (not a defence against
/// anyone: the files are ours, built into the binary).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// The files as served: each under its hashed name, and the HTML naming them.
struct Site {
    html: String,
    html_etag: String,
    files: Vec<(String, String, &'static Embedded)>,
}

fn site() -> &'static Site {
    static SITE: OnceLock<Site> = OnceLock::new();
    SITE.get_or_init(|| {
        let mut html = TEMPLATE.to_owned();
        let mut files = Vec::with_capacity(FILES.len());
        for (i, f) in FILES.iter().enumerate() {
            let hash = format!("{:016x}", fnv1a(f.bytes));
            let name = format!("{}.{hash}.{}", f.stem, f.ext);
            html = html.replace(&format!("{{{{{i}}}}}"), &format!("/assets/{name}"));
            files.push((name, format!("\"{hash}\""), f));
        }
        let html_etag = format!("\"{:016x}\"", fnv1a(html.as_bytes()));
        Site {
            html,
            html_etag,
            files,
        }
    })
}

/// Whether the request's `If-None-Match` names `etag` (or is `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

fn respond(
    headers: &HeaderMap,
    etag: &str,
    content_type: &'static str,
    cache: &'static str,
    body: &'static [u8],
) -> Response {
    let mut res = if not_modified(headers, etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

/// `GET /`: the page (which reads `?stream=NAME` itself).
#[utoipa::path(get, path = "/", tag = "page",
    responses((status = 200, description = "The live page: the streams, or one stream's chart with `?stream=NAME`", body = String, content_type = "text/html")))]
pub async fn index(headers: HeaderMap) -> Response {
    let s = site();
    let mut res = respond(
        &headers,
        &s.html_etag,
        "text/html; charset=utf-8",
        "no-cache",
        s.html.as_bytes(),
    );
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// `GET /assets/{file}`: one of the page's files, by its hashed name.
#[utoipa::path(get, path = "/assets/{file}", tag = "page",
    params(("file" = String, Path, description = "A file the page names, e.g. `page.0123456789abcdef.js`")),
    responses(
        (status = 200, description = "The file (JavaScript or CSS), cacheable for a year", content((String = "text/javascript"), (String = "text/css"))),
        (status = 404, description = "No such file (the page names the current ones)", body = super::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (_, etag, f) = site()
        .files
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no file `{}`: the page names its files",
                file.chars().take(80).collect::<String>()
            ))
        })?;
    Ok(respond(&headers, etag, f.content_type, IMMUTABLE, f.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_html_names_every_file_by_its_hashed_name() {
        let s = site();
        assert!(!s.html.contains("{{"), "a placeholder is left");
        for (name, _, _) in &s.files {
            assert!(s.html.contains(&format!("/assets/{name}")), "{name}");
        }
        // Known FNV-1a 64 vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn if_none_match_lists_and_weak_tags_match() {
        let mut h = HeaderMap::new();
        assert!(!not_modified(&h, "\"ab\""));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"ab\""),
        );
        assert!(not_modified(&h, "\"ab\""));
        assert!(!not_modified(&h, "\"abc\""));
    }
}
