//! Matching a request path against the table: ids percent-decoded and
//! checked (never used as paths), one trailing slash allowed; and the
//! query parameters the handlers read.

use http::Method;

use super::table::{Route, ROUTES};
use crate::api::error::ApiError;

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
    if !escapes_well_formed(seg.as_bytes()) {
        return Err("bad percent-encoding".into());
    }
    let bytes: Vec<u8> = percent_encoding::percent_decode(seg.as_bytes()).collect();
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

/// Whether every `%` starts a two-hex-digit escape (RFC 3986). The
/// decoders pass a malformed escape through as it is; ids and query values
/// with one are refused or ignored instead, as the old service did.
fn escapes_well_formed(s: &[u8]) -> bool {
    s.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || s.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    })
}

/// The first value of query parameter `name` (form-decoded by
/// `form_urlencoded`, `+` is a space, like Go's `URL.Query().Get`); `None`
/// when absent. A key with a malformed escape matches nothing; a value with
/// one reads as empty.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = form_urlencoded::parse(pair.as_bytes()).next()?;
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        if !escapes_well_formed(raw_key.as_bytes()) || key != name {
            return None;
        }
        Some(if escapes_well_formed(raw_value.as_bytes()) {
            value.into_owned()
        } else {
            String::new()
        })
    })
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

/// `exact` (refine a diff by content, #19): absent or empty is the
/// server's default (None); else a Go bool, anything else 400.
pub(super) fn exact_param(q: Option<&str>) -> Result<Option<bool>, ApiError> {
    match query_param(q, "exact") {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => parse_go_bool(&v)
            .map(Some)
            .ok_or_else(|| ApiError::BadRequest(format!("exact={v:?}: expected true or false"))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_decode_as_forms_and_malformed_escapes_are_ignored() {
        let q = Some("a=1&compareTo=x%2Fy+z&bad%zz=3&v=%zz&squashChunks");
        assert_eq!(query_param(q, "a").as_deref(), Some("1"));
        assert_eq!(query_param(q, "compareTo").as_deref(), Some("x/y z"));
        assert_eq!(query_param(q, "bad%zz"), None);
        assert_eq!(query_param(q, "v").as_deref(), Some(""));
        assert_eq!(query_param(q, "squashChunks").as_deref(), Some(""));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(None, "a"), None);
    }

    #[test]
    fn ids_decode_once_and_refuse_malformed_escapes() {
        assert_eq!(decode_id("abc%2Dd").as_deref(), Ok("abc-d"));
        assert_eq!(decode_id("a%zz"), Err("bad percent-encoding".to_owned()));
        assert_eq!(decode_id("a%4"), Err("bad percent-encoding".to_owned()));
        assert!(decode_id("a%2525").is_err(), "decoded once: '%25' stays");
    }
}
