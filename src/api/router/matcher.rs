//! Matching a request path against the table: ids percent-decoded and
//! checked (never used as paths), one trailing slash allowed; and the
//! query parameters the handlers read.

use http::Method;

use super::table::{Route, ROUTES};
use crate::api::ApiError;

/// Longest accepted path id: VM ids are 32 hex, snapshot ids 36, disk file
/// names about 40; room for static-inventory names, none for abuse.
pub const MAX_ID_LEN: usize = 128;

/// The ids of a matched path, in template order.
pub(super) type Params = Vec<String>;

/// Why a path did not match a route.
pub(super) enum NoMatch {
    /// No template has this shape.
    NotFound,
    /// A template matched with another method; the allowed ones.
    Method(String),
    /// The shape matched but an id is malformed.
    BadId(String),
}

/// Find the route of `method` `path`.
pub(super) fn find(method: &Method, path: &str) -> Result<(&'static Route, Params), NoMatch> {
    // One trailing slash is allowed on every route (API.md).
    let path = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    let segs: Vec<&str> = path.split('/').collect();
    let mut allowed: Vec<&'static str> = Vec::new();
    let mut bad_id = None;
    for route in ROUTES {
        let tmpl: Vec<&str> = route.path.split('/').collect();
        if tmpl.len() != segs.len() {
            continue;
        }
        let mut params = Vec::new();
        let mut ok = true;
        for (t, s) in tmpl.iter().zip(&segs) {
            if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                // An empty segment (`//`) is no id at all: not this route.
                if s.is_empty() {
                    ok = false;
                    break;
                }
                match decode_id(s) {
                    Ok(id) => params.push(id),
                    Err(why) => {
                        bad_id.get_or_insert_with(|| format!("invalid {name} id: {why}"));
                        ok = false;
                        break;
                    }
                }
            } else if t != s {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        if route.method == *method {
            return Ok((route, params));
        }
        allowed.push(route.method.as_str());
    }
    if !allowed.is_empty() {
        return Err(NoMatch::Method(allowed.join(", ")));
    }
    match bad_id {
        Some(why) => Err(NoMatch::BadId(why)),
        None => Err(NoMatch::NotFound),
    }
}

/// Percent-decode a path segment and check it is a plausible id:
/// 1..=MAX_ID_LEN of `[A-Za-z0-9._-]`, not starting with a dot. Ids are
/// looked up, never joined to a path; the check keeps junk out of logs and
/// backends all the same.
pub fn decode_id(seg: &str) -> Result<String, String> {
    let bytes = percent_decode(seg.as_bytes()).ok_or("bad percent-encoding")?;
    if bytes.is_empty() {
        return Err("empty".into());
    }
    if bytes.len() > MAX_ID_LEN {
        return Err(format!("longer than {MAX_ID_LEN} bytes"));
    }
    if bytes[0] == b'.' {
        return Err("starts with a dot".into());
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only letters, digits, '.', '_' and '-' are allowed".into());
    }
    // All ASCII by the check above.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// RFC 3986 percent-decoding; `None` on a malformed escape. Bounded by the
/// input length.
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The first value of query parameter `name` (form-decoded, `+` is a
/// space, like Go's `URL.Query().Get`); `None` when absent.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    for pair in query?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode(s.replace('+', " ").as_bytes())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        if decode(k).as_deref() == Some(name) {
            return Some(decode(v).unwrap_or_default());
        }
    }
    None
}

/// Go's `strconv.ParseBool`: `Some` for `1 t T TRUE true True` and
/// `0 f F FALSE false False`, `None` otherwise.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `squashChunks` as the old service read it: absent or empty is true,
/// unparsable is false.
pub(super) fn squash_param(query: Option<&str>) -> bool {
    match query_param(query, "squashChunks") {
        None => true,
        Some(v) if v.is_empty() => true,
        Some(v) => parse_go_bool(&v).unwrap_or(false),
    }
}

/// `compareTo`: absent or empty is none; else a checked id.
pub(super) fn compare_to_param(q: Option<&str>) -> Result<Option<String>, ApiError> {
    match query_param(q, "compareTo") {
        Some(c) if !c.is_empty() => {
            Ok(Some(decode_id(&c).map_err(|w| {
                ApiError::BadRequest(format!("invalid compareTo id: {w}"))
            })?))
        }
        _ => Ok(None),
    }
}
