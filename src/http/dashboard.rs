//! The operator dashboard: one page, its script and its stylesheet, compiled into the
//! binary and served by the admin listener without the token.
//!
//! The files hold no data — the page asks for the token and calls the admin API with it —
//! so serving them openly leaks nothing, and embedding them means the appliance needs no
//! web root, no build step and no outside host (no CDN, no web fonts).

use hyper::{Method, Response, StatusCode};

use super::Body;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// Only our own files may run or load, and the page can talk only to the admin API it was
/// served from: a hostile campaign name shown on the page cannot pull in a script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's file for `path`, or `None` if `path` is not one of them.
///
/// Cheap: a match on the path and a copy of a static string; called before the token check.
pub fn asset(method: &Method, path: &str) -> Option<Response<Body>> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/assets/app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "/assets/style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        _ => return None,
    };
    let mut response = super::text(StatusCode::OK, content_type, body);
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        // A new binary brings new files; never run yesterday's script against today's API.
        ("cache-control", "no-cache"),
    ] {
        headers.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_three_files_and_nothing_else() {
        for path in ["/", "/assets/app.js", "/assets/style.css"] {
            let r = asset(&Method::GET, path).expect(path);
            assert_eq!(r.status(), StatusCode::OK);
            assert!(r.headers().contains_key("content-security-policy"));
        }
        assert!(asset(&Method::GET, "/assets/../admin").is_none());
        assert!(asset(&Method::POST, "/").is_none());
        assert!(asset(&Method::GET, "/metrics").is_none());
    }

    #[test]
    fn the_page_loads_nothing_from_outside() {
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            // The SVG namespace is a name, not a request.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://"), "outside URL in a dashboard file");
            assert!(
                !text.contains("https://"),
                "outside URL in a dashboard file"
            );
        }
    }
}
