//! What a snapshot read asks for: the meaning of the query parameters of
//! `GET .../snapshots/{snap}` once parsed.

/// The query of `GET .../snapshots/{snap}` (`squashChunks`, `compareTo`,
/// `zeroed`), as the server's backend and snapshot manager take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetOptions {
    /// Merge logically contiguous chunks (`squashChunks`, default true).
    pub squash: bool,
    /// Answer only what changed since this older snapshot (`compareTo`).
    pub compare_to: Option<String>,
    /// Leave zeroed ranges out of `chunks` (`zeroed=separate`); by default
    /// they are in `chunks` too, so old clients copy the zeros.
    pub zeroed_separate: bool,
    /// Refine the diff by content (`exact`): None is the server's default
    /// (`[diff] exact`).
    pub exact: Option<bool>,
    /// With `compare_to`, answer this disk only (the incremental stream of
    /// one disk): the others are neither diffed nor refined.
    pub only_disk: Option<String>,
}

impl Default for GetOptions {
    fn default() -> Self {
        Self {
            squash: true,
            compare_to: None,
            zeroed_separate: false,
            exact: None,
            only_disk: None,
        }
    }
}
