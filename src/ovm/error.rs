//! The errors of the inventory layer: a variant per failed step, the
//! source kept. All are internal errors for the API (the node's own files).

use std::path::PathBuf;

use super::agent_records::RecordError;
use super::bdb::BdbError;
use crate::error::{Class, Classify};

/// The errors of the inventory layer.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("invalid inventory configuration: {0}")]
    Config(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path} is not a readable Berkeley DB hash database")]
    Db {
        path: PathBuf,
        #[source]
        source: BdbError,
    },
    #[error("{path}: the value of key {key:?} is not usable")]
    Record {
        path: PathBuf,
        key: String,
        #[source]
        source: RecordError,
    },
}

impl Classify for InventoryError {
    fn class(&self) -> Class {
        Class::Internal
    }
}
