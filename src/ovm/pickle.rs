//! A small, safe decoder of Python pickles into a value tree (the typed
//! records ovs-agent pickles into its Berkeley DB files are read from it in
//! [`super::agent_records`]).
//!
//! ovs-agent runs on Python 2 and pickles with protocols 0 to 2, so strings
//! arrive as `STRING` (the `repr` of a Python 2 `str`, with its escapes),
//! `BINSTRING`, `SHORT_BINSTRING` or `UNICODE`/`BINUNICODE`; later protocols'
//! opcodes (3 to 5) are read too. Nothing is ever executed: `GLOBAL`,
//! `REDUCE`, `BUILD` and friends only build an inert [`Value::Object`].
//!
//! The opcodes and their argument formats follow CPython's
//! `Lib/pickletools.py` (the documented reference of the format). The input
//! is untrusted: every length is checked against the bytes left before
//! anything is allocated, the number of objects is bounded by the input size,
//! and turning shared or recursive objects into a tree has a node budget
//! and a depth limit, so a hostile pickle gets an error, never a panic, a
//! hang or an allocation bomb.

use std::collections::HashMap;

/// A decoded pickle value. Python 2 `str` (and Python 3 `bytes`) become
/// [`Value::Bytes`]; `unicode`/`str` of Python 3 become [`Value::Str`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond `i64`, as its decimal text (`LONG`) or its
    /// little-endian two's complement bytes (`LONG1`/`LONG4`), kept as text.
    BigInt(String),
    Float(f64),
    Bytes(Vec<u8>),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Set(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// Anything built by calling a class or function: never called here.
    Object {
        class: String,
        args: Vec<Value>,
        state: Option<Box<Value>>,
    },
}

impl Value {
    /// The text of a string value: `Str` as is, `Bytes` (a Python 2 `str`)
    /// as UTF-8 when it is valid UTF-8, else as Latin-1 (each byte one
    /// character), so no byte an administrator typed is lost or replaced.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Bytes(b) => Some(bytes_to_text(b)),
            _ => None,
        }
    }

    /// The raw bytes of a string value (`Str` as UTF-8).
    pub fn as_bytes(&self) -> Option<Vec<u8>> {
        match self {
            Value::Str(s) => Some(s.as_bytes().to_vec()),
            Value::Bytes(b) => Some(b.clone()),
            _ => None,
        }
    }

    /// The value of `key` in a dict whose keys are strings of either kind.
    pub fn dict_get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| match k {
                    Value::Str(s) => s == key,
                    Value::Bytes(b) => b == key.as_bytes(),
                    _ => false,
                })
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// UTF-8 when valid, else Latin-1.
pub fn bytes_to_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => b.iter().map(|&c| char::from(c)).collect(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error("the pickle ends early (at byte {at})")]
    Truncated { at: usize },
    #[error("unknown opcode {opcode:#04x} at byte {at}")]
    UnknownOpcode { opcode: u8, at: usize },
    #[error("unsupported opcode {name} at byte {at}")]
    Unsupported { name: &'static str, at: usize },
    #[error("bad argument of {name} at byte {at}: {what}")]
    BadArgument {
        name: &'static str,
        at: usize,
        what: String,
    },
    #[error("{name} at byte {at} found a stack it cannot use ({what})")]
    BadStack {
        name: &'static str,
        at: usize,
        what: &'static str,
    },
    #[error("memo entry {index} used at byte {at} was never stored")]
    MissingMemo { index: u64, at: usize },
    #[error("STOP at byte {at} with {depth} values on the stack (expected 1)")]
    BadStop { at: usize, depth: usize },
    #[error("no STOP opcode: the pickle ends at byte {at}")]
    NoStop { at: usize },
    #[error("the pickle is too deeply nested or recursive (over {limit} levels)")]
    TooDeep { limit: usize },
    #[error("the pickle expands to more than {limit} values")]
    TooBig { limit: usize },
}

/// Most nesting a value may have; ovs-agent's are 2 levels deep.
pub const MAX_DEPTH: usize = 200;
/// Most values a decoded tree may hold (memo references are copied, so a
/// small pickle could otherwise describe an enormous tree).
pub const MAX_NODES: usize = 1 << 18;

/// Objects are built in an arena and referenced by index, so that memo
/// entries and mutations (`APPEND` to a memoised list) behave as in Python.
#[derive(Debug, Clone)]
enum Obj {
    Leaf(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Set(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(String),
    Object {
        class: usize,
        args: Vec<usize>,
        state: Option<usize>,
    },
}

#[derive(Clone, Copy)]
enum Slot {
    Mark,
    Ref(usize),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Obj>,
    stack: Vec<Slot>,
    memo: HashMap<u64, usize>,
}

// Opcodes, from CPython's Lib/pickletools.py (protocol in brackets).
const MARK: u8 = b'('; // [0]
const STOP: u8 = b'.'; // [0]
const POP: u8 = b'0'; // [0]
const POP_MARK: u8 = b'1'; // [1]
const DUP: u8 = b'2'; // [0]
const FLOAT: u8 = b'F'; // [0]
const INT: u8 = b'I'; // [0]
const BININT: u8 = b'J'; // [1]
const BININT1: u8 = b'K'; // [1]
const LONG: u8 = b'L'; // [0]
const BININT2: u8 = b'M'; // [1]
const NONE: u8 = b'N'; // [0]
const PERSID: u8 = b'P'; // [0]
const BINPERSID: u8 = b'Q'; // [1]
const REDUCE: u8 = b'R'; // [0]
const STRING: u8 = b'S'; // [0]
const BINSTRING: u8 = b'T'; // [1]
const SHORT_BINSTRING: u8 = b'U'; // [1]
const UNICODE: u8 = b'V'; // [0]
const BINUNICODE: u8 = b'X'; // [1]
const APPEND: u8 = b'a'; // [0]
const BUILD: u8 = b'b'; // [0]
const GLOBAL: u8 = b'c'; // [0]
const DICT: u8 = b'd'; // [0]
const EMPTY_DICT: u8 = b'}'; // [1]
const APPENDS: u8 = b'e'; // [1]
const GET: u8 = b'g'; // [0]
const BINGET: u8 = b'h'; // [1]
const INST: u8 = b'i'; // [0]
const LONG_BINGET: u8 = b'j'; // [1]
const LIST: u8 = b'l'; // [0]
const EMPTY_LIST: u8 = b']'; // [1]
const OBJ: u8 = b'o'; // [1]
const PUT: u8 = b'p'; // [0]
const BINPUT: u8 = b'q'; // [1]
const LONG_BINPUT: u8 = b'r'; // [1]
const SETITEM: u8 = b's'; // [0]
const TUPLE: u8 = b't'; // [0]
const EMPTY_TUPLE: u8 = b')'; // [1]
const SETITEMS: u8 = b'u'; // [1]
const BINFLOAT: u8 = b'G'; // [1]
const PROTO: u8 = 0x80; // [2]
const NEWOBJ: u8 = 0x81; // [2]
const EXT1: u8 = 0x82; // [2]
const EXT2: u8 = 0x83; // [2]
const EXT4: u8 = 0x84; // [2]
const TUPLE1: u8 = 0x85; // [2]
const TUPLE2: u8 = 0x86; // [2]
const TUPLE3: u8 = 0x87; // [2]
const NEWTRUE: u8 = 0x88; // [2]
const NEWFALSE: u8 = 0x89; // [2]
const LONG1: u8 = 0x8a; // [2]
const LONG4: u8 = 0x8b; // [2]
const BINBYTES: u8 = b'B'; // [3]
const SHORT_BINBYTES: u8 = b'C'; // [3]
const SHORT_BINUNICODE: u8 = 0x8c; // [4]
const BINUNICODE8: u8 = 0x8d; // [4]
const BINBYTES8: u8 = 0x8e; // [4]
const EMPTY_SET: u8 = 0x8f; // [4]
const ADDITEMS: u8 = 0x90; // [4]
const FROZENSET: u8 = 0x91; // [4]
const NEWOBJ_EX: u8 = 0x92; // [4]
const STACK_GLOBAL: u8 = 0x93; // [4]
const MEMOIZE: u8 = 0x94; // [4]
const FRAME: u8 = 0x95; // [4]
const BYTEARRAY8: u8 = 0x96; // [5]
const NEXT_BUFFER: u8 = 0x97; // [5]
const READONLY_BUFFER: u8 = 0x98; // [5]
/// Highest protocol defined (Python 3.8+).
const HIGHEST_PROTOCOL: u8 = 5;

/// Decodes one pickle (up to its `STOP`; trailing bytes are ignored, as
/// Python's `loads` does).
pub fn decode(data: &[u8]) -> Result<Value, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let root = m.run()?;
    let mut budget = MAX_NODES;
    m.materialize(root, 0, &mut budget)
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated {
                at: self.data.len(),
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64, PickleError> {
        Ok(self
            .take(n)?
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// A length argument that must fit in what is left of the input.
    fn len_arg(&mut self, n: usize, name: &'static str, at: usize) -> Result<usize, PickleError> {
        let len = self.le(n)?;
        let left = (self.data.len() - self.pos) as u64;
        if len > left {
            return Err(PickleError::BadArgument {
                name,
                at,
                what: format!("length {len} past the end of the input"),
            });
        }
        Ok(len as usize)
    }

    /// A protocol-0 argument: the bytes up to the next newline (excluded).
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = &self.data[self.pos..];
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated {
                at: self.data.len(),
            })?;
        self.pos += nl + 1;
        Ok(&rest[..nl])
    }

    fn alloc(&mut self, o: Obj) -> usize {
        self.arena.push(o);
        self.arena.len() - 1
    }

    fn push(&mut self, o: Obj) {
        let i = self.alloc(o);
        self.stack.push(Slot::Ref(i));
    }

    fn pop(&mut self, name: &'static str, at: usize) -> Result<usize, PickleError> {
        match self.stack.pop() {
            Some(Slot::Ref(i)) => Ok(i),
            Some(Slot::Mark) => Err(PickleError::BadStack {
                name,
                at,
                what: "a mark where a value was expected",
            }),
            None => Err(PickleError::BadStack {
                name,
                at,
                what: "empty stack",
            }),
        }
    }

    fn top(&self, name: &'static str, at: usize) -> Result<usize, PickleError> {
        match self.stack.last() {
            Some(Slot::Ref(i)) => Ok(*i),
            _ => Err(PickleError::BadStack {
                name,
                at,
                what: "no value on top",
            }),
        }
    }

    /// Pops everything down to the topmost mark (and the mark).
    fn pop_mark(&mut self, name: &'static str, at: usize) -> Result<Vec<usize>, PickleError> {
        let m = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or(PickleError::BadStack {
                name,
                at,
                what: "no mark",
            })?;
        let items = self.stack[m + 1..]
            .iter()
            .map(|s| match s {
                Slot::Ref(i) => *i,
                Slot::Mark => unreachable!("rposition found the last mark"),
            })
            .collect();
        self.stack.truncate(m);
        Ok(items)
    }

    fn memo_get(&mut self, index: u64, at: usize) -> Result<(), PickleError> {
        let i = *self
            .memo
            .get(&index)
            .ok_or(PickleError::MissingMemo { index, at })?;
        self.stack.push(Slot::Ref(i));
        Ok(())
    }

    fn memo_put(&mut self, index: u64, name: &'static str, at: usize) -> Result<(), PickleError> {
        let i = self.top(name, at)?;
        self.memo.insert(index, i);
        Ok(())
    }

    fn append_to(
        &mut self,
        target: usize,
        items: Vec<usize>,
        name: &'static str,
        at: usize,
    ) -> Result<(), PickleError> {
        match &mut self.arena[target] {
            Obj::List(v) | Obj::Set(v) => {
                v.extend(items);
                Ok(())
            }
            // `list.extend` on a custom object: keep the items as its args.
            Obj::Object { args, .. } => {
                args.extend(items);
                Ok(())
            }
            _ => Err(PickleError::BadStack {
                name,
                at,
                what: "appending to something that is not a list",
            }),
        }
    }

    fn set_items(
        &mut self,
        target: usize,
        items: Vec<usize>,
        name: &'static str,
        at: usize,
    ) -> Result<(), PickleError> {
        if items.len() % 2 != 0 {
            return Err(PickleError::BadStack {
                name,
                at,
                what: "an odd number of keys and values",
            });
        }
        match &mut self.arena[target] {
            Obj::Dict(d) => {
                for kv in items.chunks_exact(2) {
                    d.push((kv[0], kv[1]));
                }
                Ok(())
            }
            _ => Err(PickleError::BadStack {
                name,
                at,
                what: "setting items of something that is not a dict",
            }),
        }
    }

    fn int_line(&mut self, name: &'static str, at: usize) -> Result<Obj, PickleError> {
        let line = self.line()?;
        let text = std::str::from_utf8(line).unwrap_or("").trim();
        // Python 2.3+ writes True and False as `I01` and `I00`.
        match text {
            "01" if name == "INT" => return Ok(Obj::Leaf(Value::Bool(true))),
            "00" if name == "INT" => return Ok(Obj::Leaf(Value::Bool(false))),
            _ => {}
        }
        let digits = text.strip_suffix('L').unwrap_or(text);
        if let Ok(v) = digits.parse::<i64>() {
            return Ok(Obj::Leaf(Value::Int(v)));
        }
        let body = digits.strip_prefix('-').unwrap_or(digits);
        if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Obj::Leaf(Value::BigInt(digits.to_owned())));
        }
        Err(PickleError::BadArgument {
            name,
            at,
            what: format!("not an integer: {:?}", bytes_to_text(line)),
        })
    }

    fn global_name(&mut self, at: usize) -> Result<String, PickleError> {
        let module = self.line()?;
        let name = self.line()?;
        if module.is_empty() || name.is_empty() {
            return Err(PickleError::BadArgument {
                name: "GLOBAL",
                at,
                what: "empty module or name".into(),
            });
        }
        Ok(format!("{}.{}", bytes_to_text(module), bytes_to_text(name)))
    }

    fn run(&mut self) -> Result<usize, PickleError> {
        loop {
            let at = self.pos;
            let op = match self.data.get(self.pos) {
                Some(&b) => b,
                None => return Err(PickleError::NoStop { at }),
            };
            self.pos += 1;
            match op {
                STOP => {
                    return match self.stack.as_slice() {
                        [Slot::Ref(i)] => Ok(*i),
                        s => Err(PickleError::BadStop { at, depth: s.len() }),
                    }
                }
                PROTO => {
                    let p = self.byte()?;
                    if p > HIGHEST_PROTOCOL {
                        return Err(PickleError::BadArgument {
                            name: "PROTO",
                            at,
                            what: format!("unknown protocol {p}"),
                        });
                    }
                }
                FRAME => {
                    // Framing only groups opcodes; the frame's bytes follow.
                    self.le(8)?;
                }
                MARK => self.stack.push(Slot::Mark),
                POP => {
                    self.stack.pop().ok_or(PickleError::BadStack {
                        name: "POP",
                        at,
                        what: "empty stack",
                    })?;
                }
                POP_MARK => {
                    self.pop_mark("POP_MARK", at)?;
                }
                DUP => {
                    let i = self.top("DUP", at)?;
                    self.stack.push(Slot::Ref(i));
                }
                NONE => self.push(Obj::Leaf(Value::None)),
                NEWTRUE => self.push(Obj::Leaf(Value::Bool(true))),
                NEWFALSE => self.push(Obj::Leaf(Value::Bool(false))),
                INT => {
                    let o = self.int_line("INT", at)?;
                    self.push(o);
                }
                LONG => {
                    let o = self.int_line("LONG", at)?;
                    self.push(o);
                }
                BININT => {
                    let v = self.le(4)? as u32 as i32;
                    self.push(Obj::Leaf(Value::Int(i64::from(v))));
                }
                BININT1 => {
                    let v = self.byte()?;
                    self.push(Obj::Leaf(Value::Int(i64::from(v))));
                }
                BININT2 => {
                    let v = self.le(2)?;
                    self.push(Obj::Leaf(Value::Int(v as i64)));
                }
                LONG1 | LONG4 => {
                    let (n, name) = if op == LONG1 {
                        (1, "LONG1")
                    } else {
                        (4, "LONG4")
                    };
                    let len = self.len_arg(n, name, at)?;
                    let bytes = self.take(len)?;
                    self.push(Obj::Leaf(long_from_le(bytes)));
                }
                FLOAT => {
                    let line = self.line()?;
                    let v = std::str::from_utf8(line)
                        .ok()
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .ok_or_else(|| PickleError::BadArgument {
                            name: "FLOAT",
                            at,
                            what: format!("not a float: {:?}", bytes_to_text(line)),
                        })?;
                    self.push(Obj::Leaf(Value::Float(v)));
                }
                BINFLOAT => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(Obj::Leaf(Value::Float(v)));
                }
                STRING => {
                    let line = self.line()?;
                    let b = decode_string_repr(line).map_err(|what| PickleError::BadArgument {
                        name: "STRING",
                        at,
                        what,
                    })?;
                    self.push(Obj::Leaf(Value::Bytes(b)));
                }
                BINSTRING | SHORT_BINSTRING | BINBYTES | SHORT_BINBYTES | BINBYTES8
                | BYTEARRAY8 => {
                    let (n, name) = match op {
                        BINSTRING => (4, "BINSTRING"),
                        SHORT_BINSTRING => (1, "SHORT_BINSTRING"),
                        BINBYTES => (4, "BINBYTES"),
                        SHORT_BINBYTES => (1, "SHORT_BINBYTES"),
                        BINBYTES8 => (8, "BINBYTES8"),
                        _ => (8, "BYTEARRAY8"),
                    };
                    let len = self.len_arg(n, name, at)?;
                    let b = self.take(len)?.to_vec();
                    self.push(Obj::Leaf(Value::Bytes(b)));
                }
                UNICODE => {
                    let line = self.line()?;
                    let s = decode_raw_unicode_escape(line).map_err(|what| {
                        PickleError::BadArgument {
                            name: "UNICODE",
                            at,
                            what,
                        }
                    })?;
                    self.push(Obj::Leaf(Value::Str(s)));
                }
                BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => {
                    let (n, name) = match op {
                        BINUNICODE => (4, "BINUNICODE"),
                        SHORT_BINUNICODE => (1, "SHORT_BINUNICODE"),
                        _ => (8, "BINUNICODE8"),
                    };
                    let len = self.len_arg(n, name, at)?;
                    let b = self.take(len)?;
                    // Python writes these with the "surrogatepass" handler;
                    // a lone surrogate is not valid UTF-8 and is replaced.
                    let s = String::from_utf8_lossy(b).into_owned();
                    self.push(Obj::Leaf(Value::Str(s)));
                }
                EMPTY_LIST => self.push(Obj::List(Vec::new())),
                EMPTY_DICT => self.push(Obj::Dict(Vec::new())),
                EMPTY_TUPLE => self.push(Obj::Tuple(Vec::new())),
                EMPTY_SET => self.push(Obj::Set(Vec::new())),
                LIST => {
                    let items = self.pop_mark("LIST", at)?;
                    self.push(Obj::List(items));
                }
                TUPLE => {
                    let items = self.pop_mark("TUPLE", at)?;
                    self.push(Obj::Tuple(items));
                }
                FROZENSET => {
                    let items = self.pop_mark("FROZENSET", at)?;
                    self.push(Obj::Set(items));
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1 + 1);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop("TUPLE1-3", at)?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items));
                }
                DICT => {
                    let items = self.pop_mark("DICT", at)?;
                    let d = self.alloc(Obj::Dict(Vec::new()));
                    self.set_items(d, items, "DICT", at)?;
                    self.stack.push(Slot::Ref(d));
                }
                APPEND => {
                    let v = self.pop("APPEND", at)?;
                    let l = self.top("APPEND", at)?;
                    self.append_to(l, vec![v], "APPEND", at)?;
                }
                APPENDS | ADDITEMS => {
                    let name = if op == APPENDS { "APPENDS" } else { "ADDITEMS" };
                    let items = self.pop_mark(name, at)?;
                    let l = self.top(name, at)?;
                    self.append_to(l, items, name, at)?;
                }
                SETITEM => {
                    let v = self.pop("SETITEM", at)?;
                    let k = self.pop("SETITEM", at)?;
                    let d = self.top("SETITEM", at)?;
                    self.set_items(d, vec![k, v], "SETITEM", at)?;
                }
                SETITEMS => {
                    let items = self.pop_mark("SETITEMS", at)?;
                    let d = self.top("SETITEMS", at)?;
                    self.set_items(d, items, "SETITEMS", at)?;
                }
                GET => {
                    let line = self.line()?;
                    let i = parse_decimal(line).ok_or_else(|| PickleError::BadArgument {
                        name: "GET",
                        at,
                        what: "not an index".into(),
                    })?;
                    self.memo_get(i, at)?;
                }
                BINGET => {
                    let i = self.le(1)?;
                    self.memo_get(i, at)?;
                }
                LONG_BINGET => {
                    let i = self.le(4)?;
                    self.memo_get(i, at)?;
                }
                PUT => {
                    let line = self.line()?;
                    let i = parse_decimal(line).ok_or_else(|| PickleError::BadArgument {
                        name: "PUT",
                        at,
                        what: "not an index".into(),
                    })?;
                    self.memo_put(i, "PUT", at)?;
                }
                BINPUT => {
                    let i = self.le(1)?;
                    self.memo_put(i, "BINPUT", at)?;
                }
                LONG_BINPUT => {
                    let i = self.le(4)?;
                    self.memo_put(i, "LONG_BINPUT", at)?;
                }
                MEMOIZE => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i, "MEMOIZE", at)?;
                }
                GLOBAL => {
                    let g = self.global_name(at)?;
                    self.push(Obj::Global(g));
                }
                STACK_GLOBAL => {
                    let name = self.pop("STACK_GLOBAL", at)?;
                    let module = self.pop("STACK_GLOBAL", at)?;
                    let text = |m: &Self, i: usize| match &m.arena[i] {
                        Obj::Leaf(v) => v.as_text(),
                        _ => None,
                    };
                    let (Some(module), Some(name)) = (text(self, module), text(self, name)) else {
                        return Err(PickleError::BadStack {
                            name: "STACK_GLOBAL",
                            at,
                            what: "module and name must be strings",
                        });
                    };
                    self.push(Obj::Global(format!("{module}.{name}")));
                }
                REDUCE | NEWOBJ => {
                    let name = if op == REDUCE { "REDUCE" } else { "NEWOBJ" };
                    let args = self.pop(name, at)?;
                    let class = self.pop(name, at)?;
                    self.push(Obj::Object {
                        class,
                        args: vec![args],
                        state: None,
                    });
                }
                NEWOBJ_EX => {
                    let kwargs = self.pop("NEWOBJ_EX", at)?;
                    let args = self.pop("NEWOBJ_EX", at)?;
                    let class = self.pop("NEWOBJ_EX", at)?;
                    self.push(Obj::Object {
                        class,
                        args: vec![args, kwargs],
                        state: None,
                    });
                }
                INST => {
                    let g = self.global_name(at)?;
                    let args = self.pop_mark("INST", at)?;
                    let class = self.alloc(Obj::Global(g));
                    self.push(Obj::Object {
                        class,
                        args,
                        state: None,
                    });
                }
                OBJ => {
                    let mut items = self.pop_mark("OBJ", at)?;
                    if items.is_empty() {
                        return Err(PickleError::BadStack {
                            name: "OBJ",
                            at,
                            what: "no class after the mark",
                        });
                    }
                    let class = items.remove(0);
                    self.push(Obj::Object {
                        class,
                        args: items,
                        state: None,
                    });
                }
                BUILD => {
                    let state = self.pop("BUILD", at)?;
                    let target = self.top("BUILD", at)?;
                    match &mut self.arena[target] {
                        Obj::Object { state: s, .. } => *s = Some(state),
                        _ => {
                            return Err(PickleError::BadStack {
                                name: "BUILD",
                                at,
                                what: "state for something that is not an object",
                            })
                        }
                    }
                }
                PERSID | BINPERSID => return Err(PickleError::Unsupported { name: "PERSID", at }),
                EXT1 | EXT2 | EXT4 => {
                    return Err(PickleError::Unsupported {
                        name: "EXT (extension registry)",
                        at,
                    })
                }
                NEXT_BUFFER | READONLY_BUFFER => {
                    return Err(PickleError::Unsupported {
                        name: "out-of-band buffers",
                        at,
                    })
                }
                opcode => return Err(PickleError::UnknownOpcode { opcode, at }),
            }
        }
    }

    fn materialize(
        &self,
        i: usize,
        depth: usize,
        budget: &mut usize,
    ) -> Result<Value, PickleError> {
        if depth > MAX_DEPTH {
            return Err(PickleError::TooDeep { limit: MAX_DEPTH });
        }
        *budget = budget
            .checked_sub(1)
            .ok_or(PickleError::TooBig { limit: MAX_NODES })?;
        let all = |ids: &[usize], budget: &mut usize| -> Result<Vec<Value>, PickleError> {
            ids.iter()
                .map(|&c| self.materialize(c, depth + 1, budget))
                .collect()
        };
        Ok(match &self.arena[i] {
            Obj::Leaf(v) => {
                // Bytes and strings are charged by size too, so copies of a
                // big memoised string stay within the budget.
                let weight = match v {
                    Value::Bytes(b) => b.len() / 64,
                    Value::Str(s) => s.len() / 64,
                    _ => 0,
                };
                *budget = budget
                    .checked_sub(weight)
                    .ok_or(PickleError::TooBig { limit: MAX_NODES })?;
                v.clone()
            }
            Obj::List(ids) => Value::List(all(ids, budget)?),
            Obj::Tuple(ids) => Value::Tuple(all(ids, budget)?),
            Obj::Set(ids) => Value::Set(all(ids, budget)?),
            Obj::Dict(kvs) => {
                let mut out = Vec::with_capacity(kvs.len());
                for &(k, v) in kvs {
                    out.push((
                        self.materialize(k, depth + 1, budget)?,
                        self.materialize(v, depth + 1, budget)?,
                    ));
                }
                Value::Dict(out)
            }
            Obj::Global(name) => Value::Object {
                class: name.clone(),
                args: Vec::new(),
                state: None,
            },
            Obj::Object { class, args, state } => {
                let class = match &self.arena[*class] {
                    Obj::Global(n) => n.clone(),
                    _ => "<callable>".to_owned(),
                };
                let args = all(args, budget)?;
                let state = match state {
                    Some(s) => Some(Box::new(self.materialize(*s, depth + 1, budget)?)),
                    None => None,
                };
                Value::Object { class, args, state }
            }
        })
    }
}

fn parse_decimal(line: &[u8]) -> Option<u64> {
    std::str::from_utf8(line).ok()?.trim().parse().ok()
}

/// `LONG1`/`LONG4`: little-endian two's complement.
fn long_from_le(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() <= 8 {
        let neg = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
        buf[..bytes.len()].copy_from_slice(bytes);
        return Value::Int(i64::from_le_bytes(buf));
    }
    // Too big for i64: keep its two's complement bytes as hex text (no
    // record ovs-agent writes holds such numbers).
    let hex: String = bytes.iter().rev().map(|b| format!("{b:02x}")).collect();
    Value::BigInt(format!("0x{hex} (two's complement)"))
}

fn hex_val(b: u8) -> Option<u32> {
    (b as char).to_digit(16)
}

/// The argument of a protocol-0 `STRING`: Python 2's `repr` of a `str`,
/// quoted with `'` or `"`, decoded the way Python's `string-escape` codec
/// does (`\\ \' \" \a \b \f \n \r \t \v`, `\xhh`, octal `\ooo`, a
/// backslash-newline vanishes, any other backslash stays as is).
pub fn decode_string_repr(line: &[u8]) -> Result<Vec<u8>, String> {
    // pickle.py refuses a line not both starting and ending with the same
    // quote ("insecure string pickle").
    let inner = match line {
        [q, inner @ .., q2] if (*q == b'\'' || *q == b'"') && q == q2 => inner,
        _ => return Err("not a quoted string".into()),
    };
    unescape_python2(inner)
}

/// Python 2's `string-escape` decoding of the inside of a string literal
/// (shared with the vm.cfg parser, whose literals use the same escapes).
pub fn unescape_python2(inner: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = inner.get(i) else {
            return Err("a trailing backslash".into());
        };
        i += 1;
        match e {
            b'\n' => {}
            b'\\' => out.push(b'\\'),
            b'\'' => out.push(b'\''),
            b'"' => out.push(b'"'),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'x' => {
                let (Some(h), Some(l)) = (
                    inner.get(i).copied().and_then(hex_val),
                    inner.get(i + 1).copied().and_then(hex_val),
                ) else {
                    return Err(format!("invalid \\x escape at byte {}", i - 2));
                };
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match inner.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                // Python keeps the low byte of \400-\777.
                out.push((v & 0xff) as u8);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Ok(out)
}

fn hex_u32(hex: &[u8]) -> Option<u32> {
    hex.iter()
        .try_fold(0u32, |v, &h| v.checked_mul(16)?.checked_add(hex_val(h)?))
}

/// The argument of a protocol-0 `UNICODE`: the `raw-unicode-escape` codec.
/// Bytes are Latin-1 characters; `\uXXXX` and `\UXXXXXXXX` are escapes only
/// after an odd number of backslashes.
pub fn decode_raw_unicode_escape(line: &[u8]) -> Result<String, String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if line[i] != b'\\' {
            out.push(char::from(line[i]));
            i += 1;
            continue;
        }
        let run = line[i..].iter().take_while(|&&b| b == b'\\').count();
        let next = line.get(i + run).copied();
        if run % 2 == 1 && matches!(next, Some(b'u') | Some(b'U')) {
            out.extend(std::iter::repeat_n('\\', run - 1));
            let digits = if next == Some(b'u') { 4 } else { 8 };
            let start = i + run + 1;
            let hex = line
                .get(start..start + digits)
                .ok_or("a truncated \\u escape")?;
            let v = hex_u32(hex).ok_or("an invalid \\u escape")?;
            i = start + digits;
            // Python 2 narrow builds wrote characters past U+FFFF as a
            // surrogate pair of \u escapes: join them.
            if (0xd800..0xdc00).contains(&v) && line.get(i..i + 2) == Some(&b"\\u"[..]) {
                if let Some(lo) = line.get(i + 2..i + 6).and_then(hex_u32) {
                    if (0xdc00..0xe000).contains(&lo) {
                        let c = 0x10000 + ((v - 0xd800) << 10) + (lo - 0xdc00);
                        out.push(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER));
                        i += 6;
                        continue;
                    }
                }
            }
            // A lone surrogate cannot be a Rust char.
            out.push(char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER));
        } else {
            out.extend(std::iter::repeat_n('\\', run));
            i += run;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: &[u8]) -> Value {
        decode(b).unwrap()
    }

    #[test]
    fn protocol0_dict_of_python2_strings() {
        // Python 2: pickle.dumps({'a': 'x', 'n': 1, 't': True}, 0)
        let p = b"(dp0\nS'a'\np1\nS'x'\np2\nsS'n'\np3\nI1\nsS't'\np4\nI01\ns.";
        let v = d(p);
        assert_eq!(v.dict_get("a"), Some(&Value::Bytes(b"x".to_vec())));
        assert_eq!(v.dict_get("n"), Some(&Value::Int(1)));
        assert_eq!(v.dict_get("t"), Some(&Value::Bool(true)));
    }

    #[test]
    fn string_repr_escapes() {
        let cases: &[(&[u8], &[u8])] = &[
            (br"'plain'", b"plain"),
            (br#""it's""#, b"it's"),
            (br#"'both \' and "'"#, b"both ' and \""),
            (br"'\x00\xff\n\t\r\\'", b"\x00\xff\n\t\r\\"),
            (br"'\101\7\0'", b"A\x07\x00"),
            (br"'\q'", b"\\q"),
            (b"'caf\xc3\xa9'", "café".as_bytes()),
        ];
        for (input, want) in cases {
            assert_eq!(decode_string_repr(input).unwrap(), *want, "{input:?}");
        }
        for bad in [
            &b"'unterminated"[..],
            b"noquote",
            b"'mixed\"",
            b"'\\x4'",
            b"'",
        ] {
            assert!(decode_string_repr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn raw_unicode_escape() {
        assert_eq!(decode_raw_unicode_escape(br"caf\u00e9").unwrap(), "café");
        assert_eq!(
            decode_raw_unicode_escape(br"a\\u0041").unwrap(),
            "a\\\\u0041"
        );
        assert_eq!(decode_raw_unicode_escape(br"\U0001f600").unwrap(), "😀");
        assert_eq!(decode_raw_unicode_escape(br"\ud83d\ude00!").unwrap(), "😀!");
        assert_eq!(decode_raw_unicode_escape(br"\ud83d?").unwrap(), "\u{fffd}?");
        assert_eq!(decode_raw_unicode_escape(b"\xe9").unwrap(), "é");
        assert!(decode_raw_unicode_escape(br"\u12").is_err());
    }

    #[test]
    fn protocol2_opcodes() {
        // {'k': ['a', u'\xe9', 300, -1, 2**40, None, False]} in protocol 2
        // written the way Python 2 does (SHORT_BINSTRING, BINUNICODE).
        let mut p = vec![PROTO, 2, EMPTY_DICT, BINPUT, 0];
        p.extend_from_slice(&[SHORT_BINSTRING, 1, b'k', EMPTY_LIST, BINPUT, 1, MARK]);
        p.extend_from_slice(&[SHORT_BINSTRING, 1, b'a']);
        p.extend_from_slice(&[BINUNICODE, 2, 0, 0, 0, 0xc3, 0xa9]);
        p.extend_from_slice(&[BININT2, 0x2c, 0x01]);
        p.extend_from_slice(&[BININT, 0xff, 0xff, 0xff, 0xff]);
        p.extend_from_slice(&[LONG1, 6, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[NONE, NEWFALSE, APPENDS, SETITEM, STOP]);
        let v = d(&p);
        assert_eq!(
            v.dict_get("k"),
            Some(&Value::List(vec![
                Value::Bytes(b"a".to_vec()),
                Value::Str("é".into()),
                Value::Int(300),
                Value::Int(-1),
                Value::Int(1 << 40),
                Value::None,
                Value::Bool(false),
            ]))
        );
    }

    #[test]
    fn memo_sees_later_mutation() {
        // l = []; d = {'a': l, 'b': l}; l.append(1) semantics: the list is
        // memoised empty, filled after, then fetched again.
        let p = [
            PROTO,
            2,
            EMPTY_DICT,
            SHORT_BINSTRING,
            1,
            b'a',
            EMPTY_LIST,
            BINPUT,
            7,
            BININT1,
            5,
            APPEND,
            SETITEM,
            SHORT_BINSTRING,
            1,
            b'b',
            BINGET,
            7,
            SETITEM,
            STOP,
        ];
        let v = d(&p);
        assert_eq!(v.dict_get("b"), Some(&Value::List(vec![Value::Int(5)])));
    }

    #[test]
    fn hostile_pickles_give_errors() {
        // A list containing itself.
        let p = [EMPTY_LIST, BINPUT, 0, BINGET, 0, APPEND, STOP];
        assert_eq!(decode(&p), Err(PickleError::TooDeep { limit: MAX_DEPTH }));
        // Doubling: each level holds the previous twice (2^40 nodes).
        let mut p = vec![EMPTY_LIST, BINPUT, 0, POP];
        for _ in 0..40 {
            p.extend_from_slice(&[BINGET, 0, BINGET, 0, TUPLE2, BINPUT, 0, POP]);
        }
        p.extend_from_slice(&[BINGET, 0, STOP]);
        assert_eq!(decode(&p), Err(PickleError::TooBig { limit: MAX_NODES }));
        // Lengths past the end are refused before allocating.
        assert!(matches!(
            decode(&[BINSTRING, 0xff, 0xff, 0xff, 0x7f]),
            Err(PickleError::BadArgument { .. })
        ));
        assert_eq!(decode(b"S'abc'\n"), Err(PickleError::NoStop { at: 7 }));
        assert!(matches!(
            decode(b"\xff"),
            Err(PickleError::UnknownOpcode { .. })
        ));
        assert!(matches!(decode(b"a."), Err(PickleError::BadStack { .. })));
        assert!(matches!(
            decode(b"NN."),
            Err(PickleError::BadStop { depth: 2, .. })
        ));
    }
}
