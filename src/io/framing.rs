//! The bytes around each range's data, given by the caller: the io core
//! knows no wire format.

use bytes::Bytes;

/// What surrounds the data of each range in a body. The io core calls it
/// in body order (`start`, then per range `range_start`, every `data` frame,
/// `range_end`, then `finish`) and sends what it returns; the wire formats
/// implement it above this layer.
pub trait Framing: Send + 'static {
    /// Bytes before the body's first range (or before `finish` if none).
    fn start(&mut self) -> Option<Bytes> {
        None
    }
    /// Bytes before range `i`'s data.
    fn range_start(&mut self, _i: usize) -> Option<Bytes> {
        None
    }
    /// Sees every data frame of range `i`, in order.
    fn data(&mut self, _i: usize, _frame: &[u8]) {}
    /// Bytes after range `i`'s data.
    fn range_end(&mut self, _i: usize) -> Option<Bytes> {
        None
    }
    /// Bytes after everything.
    fn finish(&mut self) -> Option<Bytes> {
        None
    }
}

pub(super) struct Plain;
impl Framing for Plain {}
