//! Xen `vm.cfg` files, repository `.ovsmeta` files, and disk specs.
//!
//! A `vm.cfg` is Python source that Xen's tools `exec`; Oracle VM writes only
//! assignments of literals to it. This module owns parsing that literal
//! subset (strings in either quote, raw and triple-quoted strings, escapes,
//! adjacent-string concatenation, integers, floats, `True`/`False`/`None`,
//! lists, tuples and dicts over several lines, comments outside strings),
//! picking the keys the exporter uses, and parsing disk specs like
//! `file:/OVS/.../disk.img,xvda,w` or `phy:/dev/mapper/x,xvdb:cdrom,r`.
//! It never evaluates anything and never touches the filesystem: callers
//! read the bytes (which are untrusted) and pass them in.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use super::pickle::{bytes_to_text, unescape_python2};

/// Deepest nesting of lists/tuples/dicts accepted (Xen's are 1 deep).
pub const MAX_NESTING: usize = 32;

/// A Python literal from a vm.cfg. Strings keep their bytes: Python 2 read
/// the file as bytes, and paths need not be UTF-8.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    Str(Vec<u8>),
    Int(i64),
    Float(f64),
    Bool(bool),
    None,
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    Dict(Vec<(PyValue, PyValue)>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmCfgError {
    #[error("line {line}: {what}")]
    Syntax { line: usize, what: String },
    #[error("line {line}: a string is not terminated")]
    UnterminatedString { line: usize },
    #[error("line {line}: nesting deeper than {MAX_NESTING} levels")]
    TooDeep { line: usize },
    #[error("required key {key:?} is missing")]
    MissingKey { key: &'static str },
    #[error("key {key:?} has the wrong type (expected {expected})")]
    WrongType {
        key: &'static str,
        expected: &'static str,
    },
}

/// The assignments of a vm.cfg, in file order (a later assignment of the
/// same key wins, as in Python).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmCfg {
    pub entries: Vec<(String, PyValue)>,
}

impl VmCfg {
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    fn err(&self, what: impl Into<String>) -> VmCfgError {
        VmCfgError::Syntax {
            line: self.line,
            what: what.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        if c == b'\n' {
            self.line += 1;
        }
        Some(c)
    }

    /// Skips blanks and comments; newlines too when `newlines` (inside
    /// brackets, where Python joins lines). A backslash before a newline
    /// always joins lines.
    fn skip(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' | 0x0c => {
                    self.bump();
                }
                b'\n' if newlines => {
                    self.bump();
                }
                b'#' => {
                    while !matches!(self.peek(), None | Some(b'\n')) {
                        self.bump();
                    }
                }
                b'\\' if self.s.get(self.pos + 1) == Some(&b'\n') => {
                    self.bump();
                    self.bump();
                }
                b'\\' if self.s.get(self.pos + 1..self.pos + 3) == Some(b"\r\n") => {
                    self.bump();
                    self.bump();
                    self.bump();
                }
                _ => break,
            }
        }
    }

    fn ident(&mut self) -> &'a [u8] {
        let start = self.pos;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_') {
            self.bump();
        }
        &self.s[start..self.pos]
    }

    fn value(&mut self, depth: usize) -> Result<PyValue, VmCfgError> {
        if depth > MAX_NESTING {
            return Err(VmCfgError::TooDeep { line: self.line });
        }
        let nl = depth > 0;
        self.skip(nl);
        let c = self.peek().ok_or_else(|| self.err("a value is missing"))?;
        match c {
            b'[' | b'(' => {
                self.bump();
                let close = if c == b'[' { b']' } else { b')' };
                let mut items = Vec::new();
                let mut trailing_comma = false;
                loop {
                    self.skip(true);
                    if self.peek() == Some(close) {
                        self.bump();
                        break;
                    }
                    items.push(self.value(depth + 1)?);
                    self.skip(true);
                    match self.bump() {
                        Some(b',') => trailing_comma = true,
                        Some(x) if x == close => {
                            trailing_comma = false;
                            break;
                        }
                        _ => return Err(self.err("expected ',' or a closing bracket")),
                    }
                }
                Ok(if c == b'[' {
                    PyValue::List(items)
                } else if items.len() == 1 && !trailing_comma {
                    // `(x)` is x, not a tuple.
                    items.pop().expect("one item")
                } else {
                    PyValue::Tuple(items)
                })
            }
            b'{' => {
                self.bump();
                let mut items = Vec::new();
                loop {
                    self.skip(true);
                    if self.peek() == Some(b'}') {
                        self.bump();
                        break;
                    }
                    let k = self.value(depth + 1)?;
                    self.skip(true);
                    if self.bump() != Some(b':') {
                        return Err(self.err("expected ':' in a dict"));
                    }
                    let v = self.value(depth + 1)?;
                    items.push((k, v));
                    self.skip(true);
                    match self.bump() {
                        Some(b',') => {}
                        Some(b'}') => break,
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
                Ok(PyValue::Dict(items))
            }
            b'\'' | b'"' => self.strings(nl, false),
            b'-' | b'+' | b'0'..=b'9' | b'.' => self.number(),
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.pos;
                let word = self.ident();
                // String prefixes: r, u, b and their pairs.
                let lower = word.to_ascii_lowercase();
                if matches!(self.peek(), Some(b'\'') | Some(b'"'))
                    && matches!(&lower[..], b"r" | b"u" | b"b" | b"ur" | b"br" | b"rb")
                {
                    return self.strings(nl, lower.contains(&b'r'));
                }
                match word {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    b"None" => Ok(PyValue::None),
                    _ => {
                        self.pos = start;
                        Err(self.err(format!(
                            "unsupported expression {:?} (only literals are read)",
                            bytes_to_text(word)
                        )))
                    }
                }
            }
            other => Err(self.err(format!("unexpected character {:?}", char::from(other)))),
        }
    }

    /// One or more adjacent string literals, concatenated.
    fn strings(&mut self, newlines: bool, first_raw: bool) -> Result<PyValue, VmCfgError> {
        let mut out = self.string(first_raw)?;
        loop {
            let save = (self.pos, self.line);
            self.skip(newlines);
            let mut raw = false;
            if matches!(
                self.peek(),
                Some(b'r') | Some(b'R') | Some(b'u') | Some(b'U') | Some(b'b') | Some(b'B')
            ) {
                let p = self.pos;
                let word = self.ident().to_ascii_lowercase();
                if matches!(self.peek(), Some(b'\'') | Some(b'"'))
                    && matches!(&word[..], b"r" | b"u" | b"b" | b"ur" | b"br" | b"rb")
                {
                    raw = word.contains(&b'r');
                } else {
                    self.pos = p;
                }
            }
            if matches!(self.peek(), Some(b'\'') | Some(b'"')) {
                out.extend(self.string(raw)?);
            } else {
                (self.pos, self.line) = save;
                return Ok(PyValue::Str(out));
            }
        }
    }

    fn string(&mut self, raw: bool) -> Result<Vec<u8>, VmCfgError> {
        let start_line = self.line;
        let q = self.bump().expect("caller saw a quote");
        let triple = self.s.get(self.pos..self.pos + 2) == Some(&[q, q][..]);
        if triple {
            self.bump();
            self.bump();
        }
        let body_start = self.pos;
        loop {
            let c = self
                .bump()
                .ok_or(VmCfgError::UnterminatedString { line: start_line })?;
            if c == b'\\' {
                self.bump()
                    .ok_or(VmCfgError::UnterminatedString { line: start_line })?;
                continue;
            }
            if c == b'\n' && !triple {
                return Err(VmCfgError::UnterminatedString { line: start_line });
            }
            if c == q && (!triple || self.s.get(self.pos..self.pos + 2) == Some(&[q, q][..])) {
                let body = &self.s[body_start..self.pos - 1];
                if triple {
                    self.bump();
                    self.bump();
                }
                return if raw {
                    Ok(body.to_vec())
                } else {
                    unescape_python2(body).map_err(|what| VmCfgError::Syntax {
                        line: start_line,
                        what,
                    })
                };
            }
        }
    }

    fn number(&mut self) -> Result<PyValue, VmCfgError> {
        let start = self.pos;
        if matches!(self.peek(), Some(b'-') | Some(b'+')) {
            self.bump();
            self.skip(false);
        }
        let digits_start = self.pos;
        loop {
            let prev = self.pos.checked_sub(1).and_then(|p| self.s.get(p)).copied();
            let exponent_sign = matches!(prev, Some(b'e') | Some(b'E')) && self.pos > digits_start;
            match self.peek() {
                Some(c) if c.is_ascii_alphanumeric() || c == b'.' || c == b'_' => {}
                Some(b'-') | Some(b'+') if exponent_sign => {}
                _ => break,
            }
            self.bump();
        }
        let neg = self.s[start] == b'-';
        let text = std::str::from_utf8(&self.s[digits_start..self.pos])
            .unwrap_or("")
            .replace('_', "");
        let text = text.strip_suffix(['L', 'l']).unwrap_or(&text).to_owned();
        let lower = text.to_ascii_lowercase();
        let int = if let Some(h) = lower.strip_prefix("0x") {
            i64::from_str_radix(h, 16).ok()
        } else if let Some(o) = lower.strip_prefix("0o") {
            i64::from_str_radix(o, 8).ok()
        } else if let Some(b) = lower.strip_prefix("0b") {
            i64::from_str_radix(b, 2).ok()
        } else if lower.len() > 1
            && lower.starts_with('0')
            && lower.bytes().all(|c| c.is_ascii_digit())
        {
            // Python 2 octal literal.
            i64::from_str_radix(&lower[1..], 8).ok()
        } else {
            lower.parse::<i64>().ok()
        };
        if let Some(v) = int {
            return Ok(PyValue::Int(if neg { v.wrapping_neg() } else { v }));
        }
        match lower.parse::<f64>() {
            Ok(v) if !lower.is_empty() && !lower.contains("inf") && !lower.contains("nan") => {
                Ok(PyValue::Float(if neg { -v } else { v }))
            }
            _ => Err(self.err(format!("bad number {text:?}"))),
        }
    }
}

/// Parses a whole vm.cfg.
pub fn parse(src: &[u8]) -> Result<VmCfg, VmCfgError> {
    let mut lx = Lexer {
        s: src,
        pos: 0,
        line: 1,
    };
    // A UTF-8 byte order mark is allowed by Python.
    if src.starts_with(b"\xef\xbb\xbf") {
        lx.pos = 3;
    }
    let mut cfg = VmCfg::default();
    loop {
        lx.skip(true);
        let Some(c) = lx.peek() else {
            return Ok(cfg);
        };
        if c == b';' {
            lx.bump();
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == b'_') {
            return Err(lx.err(format!(
                "expected a name at the start of a statement, found {:?}",
                char::from(c)
            )));
        }
        let key = bytes_to_text(lx.ident());
        lx.skip(false);
        if lx.bump() != Some(b'=') {
            return Err(lx.err(format!("expected '=' after {key:?}")));
        }
        let value = lx.value(0)?;
        lx.skip(false);
        match lx.peek() {
            None | Some(b'\n') | Some(b';') => {}
            Some(other) => {
                return Err(lx.err(format!(
                    "unexpected {:?} after the value of {key:?}",
                    char::from(other)
                )))
            }
        }
        cfg.entries.push((key, value));
    }
}

/// Where a disk's bytes are, from the part of a disk spec before the
/// first comma.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskTarget {
    /// `file:/path` (also `tap:aio:`, `tap2:aio:`, or a bare path).
    File(PathBuf),
    /// `phy:/dev/...`: a block device.
    Phy(PathBuf),
    /// An empty target: an empty cdrom drive.
    Empty,
    /// Anything else (kept whole, for the incompatibility reason).
    Other(String),
}

/// One entry of vm.cfg's `disk` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub target: DiskTarget,
    /// Guest device, without `:cdrom`.
    pub device: String,
    pub cdrom: bool,
    /// `w`, `r`, `w!`... as written.
    pub mode: String,
    /// The spec as written, for messages.
    pub raw: String,
}

/// Target prefixes that name a file, from Xen's disk configuration docs.
const FILE_PREFIXES: [&[u8]; 5] = [
    b"file:",
    b"tap:aio:",
    b"tap2:aio:",
    b"tap:tapdisk:aio:",
    b"tap2:tapdisk:aio:",
];
const PHY_PREFIX: &[u8] = b"phy:";
const CDROM_SUFFIX: &str = ":cdrom";

fn path_of(b: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(b.to_vec()))
}

/// Parses `target,device[:cdrom],mode`. Commas may appear in the target (it
/// is split from the right). A spec that does not have three parts is kept
/// as [`DiskTarget::Other`] so that the disk is still listed.
pub fn parse_disk_spec(spec: &[u8]) -> DiskSpec {
    let raw = bytes_to_text(spec);
    let mut parts = spec.rsplitn(3, |&b| b == b',');
    let (mode, device, target) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(d), Some(t)) => (m, d, t),
        _ => {
            return DiskSpec {
                target: DiskTarget::Other(raw.clone()),
                device: String::new(),
                cdrom: false,
                mode: String::new(),
                raw,
            }
        }
    };
    let device = bytes_to_text(device).trim().to_owned();
    let (device, cdrom) = match device.strip_suffix(CDROM_SUFFIX) {
        Some(d) => (d.to_owned(), true),
        None => (device, false),
    };
    let target = target.trim_ascii();
    let target = if target.is_empty() {
        DiskTarget::Empty
    } else if let Some(p) = target.strip_prefix(PHY_PREFIX) {
        DiskTarget::Phy(path_of(p))
    } else if let Some(p) = FILE_PREFIXES
        .iter()
        .find_map(|pre| target.strip_prefix(*pre))
    {
        if p.is_empty() {
            DiskTarget::Empty
        } else {
            DiskTarget::File(path_of(p))
        }
    } else if target.starts_with(b"/") {
        DiskTarget::File(path_of(target))
    } else {
        DiskTarget::Other(bytes_to_text(target))
    };
    DiskSpec {
        target,
        device,
        cdrom,
        mode: bytes_to_text(mode).trim().to_owned(),
        raw,
    }
}

/// The keys of a vm.cfg the exporter uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// `name`: the VM id.
    pub name: String,
    /// `uuid`, when present.
    pub uuid: Option<String>,
    /// `OVM_simple_name`, when present.
    pub simple_name: Option<String>,
    /// `disk`, in order (empty when absent).
    pub disks: Vec<DiskSpec>,
}

fn opt_text(cfg: &VmCfg, key: &'static str) -> Result<Option<String>, VmCfgError> {
    match cfg.get(key) {
        None | Some(PyValue::None) => Ok(None),
        Some(PyValue::Str(s)) => Ok(Some(bytes_to_text(s))),
        Some(_) => Err(VmCfgError::WrongType {
            key,
            expected: "a string",
        }),
    }
}

/// Parses a vm.cfg and picks the keys the exporter uses. `name` is
/// required; `disk` must be a list (or tuple) of strings when present.
pub fn vm_config(src: &[u8]) -> Result<VmConfig, VmCfgError> {
    let cfg = parse(src)?;
    let name = opt_text(&cfg, "name")?.ok_or(VmCfgError::MissingKey { key: "name" })?;
    if name.is_empty() {
        return Err(VmCfgError::MissingKey { key: "name" });
    }
    let disks = match cfg.get("disk") {
        None | Some(PyValue::None) => Vec::new(),
        Some(PyValue::List(items)) | Some(PyValue::Tuple(items)) => items
            .iter()
            .map(|d| match d {
                PyValue::Str(s) => Ok(parse_disk_spec(s)),
                _ => Err(VmCfgError::WrongType {
                    key: "disk",
                    expected: "a list of strings",
                }),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(VmCfgError::WrongType {
                key: "disk",
                expected: "a list of strings",
            })
        }
    };
    Ok(VmConfig {
        name,
        uuid: opt_text(&cfg, "uuid")?,
        simple_name: opt_text(&cfg, "OVM_simple_name")?,
        disks,
    })
}

/// `OBJECT_TYPE` of a virtual disk in `.ovsmeta`.
pub const OVSMETA_VIRTUAL_DISK: &str = "VIRTUAL_DISK";

/// One entry of a repository's `.ovsmeta`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OvsMetaEntry {
    pub object_type: Option<String>,
    pub simple_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OvsMetaError {
    #[error(".ovsmeta is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error(".ovsmeta is not a JSON object")]
    NotAnObject,
}

/// Parses `.ovsmeta`: a JSON object from file names to objects with
/// `OBJECT_TYPE` and `SIMPLE_NAME`. Keys are reduced to their last path
/// component (a disk is matched by its file name); entries that are not
/// objects and fields that are not strings are ignored.
pub fn parse_ovsmeta(src: &[u8]) -> Result<HashMap<String, OvsMetaEntry>, OvsMetaError> {
    let v: serde_json::Value = serde_json::from_slice(src).map_err(OvsMetaError::Json)?;
    let obj = v.as_object().ok_or(OvsMetaError::NotAnObject)?;
    let mut out = HashMap::with_capacity(obj.len());
    for (k, e) in obj {
        let Some(e) = e.as_object() else { continue };
        let name = k.rsplit('/').next().unwrap_or(k).to_owned();
        let field = |f: &str| e.get(f).and_then(|v| v.as_str()).map(str::to_owned);
        out.insert(
            name,
            OvsMetaEntry {
                object_type: field("OBJECT_TYPE"),
                simple_name: field("SIMPLE_NAME"),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# Oracle VM generated
vif = ['mac=00:21:f6:00:00:01,bridge=0004fb0010', "mac=00:21:f6:00:00:02,bridge=x"]
OVM_simple_name = 'web "front" it\'s'
disk = ['file:/OVS/Repositories/r1/VirtualDisks/a.img,xvda,w',  # system
    'file:/OVS/Repositories/r1/ISOs/b.iso,xvdb:cdrom,r',
    "phy:/dev/mapper/3600,xvdc,w!",
]
uuid = '0004fb00-0006-0000-ccaf-98a0baa2c186'
on_reboot = 'restart'
memory = 2048; maxmem = 0x1000
cpu_weight = -27
OVM_high_availability = False
guest_os_type = None
vfb = ('type=vnc', 'vncunused=1')
cpus = r'0-3\n'
extra = {'a': [1, 2.5], "b": (3,)}
name = '0004fb0000060000' \
  'ccaf98a0baa2c186'
"#;

    #[test]
    fn parses_a_realistic_vm_cfg() {
        let c = vm_config(SAMPLE.as_bytes()).unwrap();
        assert_eq!(c.name, "0004fb0000060000ccaf98a0baa2c186");
        assert_eq!(
            c.uuid.as_deref(),
            Some("0004fb00-0006-0000-ccaf-98a0baa2c186")
        );
        assert_eq!(c.simple_name.as_deref(), Some("web \"front\" it's"));
        assert_eq!(c.disks.len(), 3);
        assert_eq!(
            c.disks[0].target,
            DiskTarget::File("/OVS/Repositories/r1/VirtualDisks/a.img".into())
        );
        assert_eq!(
            (c.disks[1].device.as_str(), c.disks[1].cdrom),
            ("xvdb", true)
        );
        assert_eq!(
            c.disks[2].target,
            DiskTarget::Phy("/dev/mapper/3600".into())
        );
        assert_eq!(c.disks[2].mode, "w!");
        let cfg = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(cfg.get("maxmem"), Some(&PyValue::Int(4096)));
        assert_eq!(cfg.get("cpu_weight"), Some(&PyValue::Int(-27)));
        assert_eq!(
            cfg.get("OVM_high_availability"),
            Some(&PyValue::Bool(false))
        );
        assert_eq!(cfg.get("cpus"), Some(&PyValue::Str(b"0-3\\n".to_vec())));
        assert!(matches!(cfg.get("vfb"), Some(PyValue::Tuple(v)) if v.len() == 2));
        assert!(matches!(cfg.get("extra"), Some(PyValue::Dict(v)) if v.len() == 2));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        assert_eq!(
            parse(b"a = 1\nb = 'open\n").unwrap_err(),
            VmCfgError::UnterminatedString { line: 2 }
        );
        assert!(matches!(
            parse(b"a = 1\n\nb = [1, 2\n").unwrap_err(),
            VmCfgError::Syntax { line: 4, .. }
        ));
        assert!(matches!(
            parse(b"x = os.system('rm')\n").unwrap_err(),
            VmCfgError::Syntax { line: 1, .. }
        ));
        assert!(matches!(
            parse(b"x = 1 2\n").unwrap_err(),
            VmCfgError::Syntax { line: 1, .. }
        ));
        let deep = format!("x = {}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(
            parse(deep.as_bytes()).unwrap_err(),
            VmCfgError::TooDeep { line: 1 }
        );
        assert_eq!(
            vm_config(b"uuid = 'x'\n").unwrap_err(),
            VmCfgError::MissingKey { key: "name" }
        );
        assert!(matches!(
            vm_config(b"name = 'x'\ndisk = 'file:/a,xvda,w'\n").unwrap_err(),
            VmCfgError::WrongType { key: "disk", .. }
        ));
    }

    #[test]
    fn disk_specs() {
        let s = parse_disk_spec(b",hdc:cdrom,r");
        assert_eq!((s.target, s.cdrom), (DiskTarget::Empty, true));
        let s = parse_disk_spec(b"tap:aio:/x/y,z.img,xvda,w");
        assert_eq!(s.target, DiskTarget::File("/x/y,z.img".into()));
        let s = parse_disk_spec(b"iscsi:iqn.2001,xvda,w");
        assert_eq!(s.target, DiskTarget::Other("iscsi:iqn.2001".into()));
        let s = parse_disk_spec(b"garbage");
        assert_eq!(s.target, DiskTarget::Other("garbage".into()));
    }

    #[test]
    fn ovsmeta() {
        let m = parse_ovsmeta(
            br#"{"a.img": {"OBJECT_TYPE": "VIRTUAL_DISK", "SIMPLE_NAME": "sys"},
                 "ISOs/b.iso": {"OBJECT_TYPE": "ISO"}, "junk": 3}"#,
        )
        .unwrap();
        assert_eq!(m["a.img"].simple_name.as_deref(), Some("sys"));
        assert_eq!(m["b.iso"].object_type.as_deref(), Some("ISO"));
        assert!(!m.contains_key("junk"));
        assert!(matches!(
            parse_ovsmeta(b"[1]"),
            Err(OvsMetaError::NotAnObject)
        ));
        assert!(matches!(parse_ovsmeta(b"{"), Err(OvsMetaError::Json(_))));
    }
}
