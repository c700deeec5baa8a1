//! Route matching: host, segment-aware path prefix, methods.

use http::{Method, Request};

/// Whether `path` is `prefix` or lies under it, segment by segment (`/api` takes `/api` and
/// `/api/x`, not `/apix`); `/` takes every path.
pub(crate) fn under_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

/// `path_and_query` without `prefix` (whole segments); `/` when nothing is left.
pub(crate) fn strip_path_prefix(path_and_query: &str, prefix: &str) -> String {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    let rest = if under_prefix(path, prefix) { &path[prefix.len().min(path.len())..] } else { path };
    let rest = if rest.is_empty() { "/" } else { rest };
    format!("{rest}{query}")
}

/// `path` with its dot segments removed (RFC 3986 §5.2.4; `%2e` counts as `.`), or `None` when
/// it has none: a request is routed and forwarded under one reading of its path, so
/// `/public/../admin` cannot pass a `/public` route's stack and reach `/admin` upstream.
pub(crate) fn remove_dot_segments(path: &str) -> Option<String> {
    fn dots(segment: &str) -> Option<usize> {
        let lower = segment.to_ascii_lowercase();
        match lower.as_str() {
            "." | "%2e" => Some(1),
            ".." | "%2e%2e" | ".%2e" | "%2e." => Some(2),
            _ => None,
        }
    }
    if !path.split('/').any(|segment| dots(segment).is_some()) {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match dots(segment) {
            Some(1) => {}
            Some(_) => {
                out.pop();
            }
            _ => out.push(segment),
        }
        // A path ending in a dot segment names a directory: keep its trailing slash.
        if i == last && dots(segment).is_some() {
            out.push("");
        }
    }
    Some(format!("/{}", out.join("/")))
}

/// The host a request asked for, without the port, lowercase.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<String> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    let host = host.parse::<http::uri::Authority>().ok()?;
    Some(host.host().to_ascii_lowercase())
}

/// What a route matches on.
#[derive(Debug, Clone)]
pub(crate) struct Matcher {
    pub(crate) prefix: String,
    pub(crate) host: Option<String>,
    pub(crate) methods: Option<Vec<Method>>,
}

impl Matcher {
    /// Whether host and path match (methods aside).
    pub(crate) fn matches_path(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.host
            && host != Some(want.as_str())
        {
            return false;
        }
        under_prefix(path, &self.prefix)
    }

    pub(crate) fn takes(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|methods| methods.contains(method))
    }

    /// Sort key: longest prefix first, then a route with a host before one without.
    pub(crate) fn specificity(&self) -> (usize, bool) {
        (if self.prefix == "/" { 0 } else { self.prefix.len() }, self.host.is_some())
    }
}

/// What the table says of a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// The index of the route that takes it.
    Route(usize),
    /// Routes take the path, with other methods: the `Allow` value.
    MethodNotAllowed(String),
    /// No route takes the path.
    Nothing,
}

/// Finds the route for a request among `matchers` (sorted by specificity).
pub(crate) fn find<'a>(
    matchers: impl Iterator<Item = &'a Matcher>,
    host: Option<&str>,
    method: &Method,
    path: &str,
) -> Found {
    let mut allow: Vec<Method> = Vec::new();
    let mut any_method = false;
    for (i, matcher) in matchers.enumerate() {
        if !matcher.matches_path(host, path) {
            continue;
        }
        if matcher.takes(method) {
            return Found::Route(i);
        }
        match &matcher.methods {
            Some(methods) => allow.extend(methods.iter().cloned()),
            None => any_method = true,
        }
    }
    if allow.is_empty() && !any_method {
        return Found::Nothing;
    }
    allow.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    allow.dedup();
    Found::MethodNotAllowed(allow.iter().map(Method::as_str).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under_prefix("/api/users", "/api/users"));
        assert!(under_prefix("/api/users/7", "/api/users"));
        assert!(!under_prefix("/api/usersx", "/api/users"));
        assert!(!under_prefix("/api", "/api/users"));
        assert!(under_prefix("/anything", "/"));
    }

    #[test]
    fn dot_segments_are_removed_encoded_or_not() {
        assert_eq!(remove_dot_segments("/api/users"), None);
        assert_eq!(remove_dot_segments("/api/public/../admin/users").as_deref(), Some("/api/admin/users"));
        assert_eq!(remove_dot_segments("/api/public/%2E%2e/admin").as_deref(), Some("/api/admin"));
        assert_eq!(remove_dot_segments("/a/./b/.").as_deref(), Some("/a/b/"));
        assert_eq!(remove_dot_segments("/../../etc").as_deref(), Some("/etc"));
        assert_eq!(remove_dot_segments("/a/..").as_deref(), Some("/"));
        assert_eq!(remove_dot_segments("/a/...b"), None, "not a dot segment");
    }

    #[test]
    fn strip_keeps_the_query_and_a_leading_slash() {
        assert_eq!(strip_path_prefix("/api/users/7?x=1", "/api"), "/users/7?x=1");
        assert_eq!(strip_path_prefix("/api?x=1", "/api"), "/?x=1");
        assert_eq!(strip_path_prefix("/api", "/api"), "/");
        assert_eq!(strip_path_prefix("/apix", "/api"), "/apix");
    }

    #[test]
    fn most_specific_route_with_the_method_wins() {
        let m = |prefix: &str, host: Option<&str>, methods: Option<&[Method]>| Matcher {
            prefix: prefix.into(),
            host: host.map(Into::into),
            methods: methods.map(<[Method]>::to_vec),
        };
        let mut table = [
            m("/api", None, Some(&[Method::POST])),
            m("/api/users", None, Some(&[Method::GET])),
            m("/api/users", Some("a.example"), Some(&[Method::GET])),
        ];
        table.sort_by_key(|m| std::cmp::Reverse(m.specificity()));
        assert_eq!(find(table.iter(), Some("a.example"), &Method::GET, "/api/users/7"), Found::Route(0));
        assert_eq!(find(table.iter(), None, &Method::GET, "/api/users/7"), Found::Route(1));
        assert_eq!(find(table.iter(), None, &Method::POST, "/api/users/7"), Found::Route(2));
        assert_eq!(
            find(table.iter(), None, &Method::DELETE, "/api/users/7"),
            Found::MethodNotAllowed("GET, POST".into())
        );
        assert_eq!(find(table.iter(), None, &Method::GET, "/other"), Found::Nothing);
    }
}
