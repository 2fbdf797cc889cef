//! The flag a long snapshot read checks to stop early once its asker is
//! gone. It travels beside the [`GetOptions`](crate::wire::GetOptions), not
//! in them: the options are what is asked (the wire's snapshot query, and
//! compare by value), the flag is who still waits for the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set by the api when a request's client went away; a refining diff
/// (`exact`) checks it between windows and while it waits for a slot.
/// Clones share the flag; a default one is never set.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
