//! The records ovs-agent pickles into its Berkeley DB files, read from the
//! decoded value tree of [`super::pickle`]: a repository of the
//! `repository` database, the Manager's address of the `server` database.

use std::path::PathBuf;

use super::pickle::{bytes_to_text, decode, PickleError, Value};

/// A repository as ovs-agent records it in its `repository` database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryRecord {
    /// The database key: the repository id.
    pub id: String,
    pub mount_point: PathBuf,
    pub filesystem: String,
    pub alias: String,
    pub manager_uuid: String,
    pub version: String,
    pub fs_location: String,
}

/// What is wrong with a decoded record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the value cannot be unpickled")]
    Pickle(#[source] PickleError),
    #[error("the value is not a dict")]
    NotADict,
    #[error("required key {key:?} is missing")]
    MissingKey { key: &'static str },
    #[error("key {key:?} is not a string")]
    NotAString { key: &'static str },
}

/// Keys of a repository record, all required.
const REPOSITORY_KEYS: [&str; 6] = [
    "mount_point",
    "filesystem",
    "alias",
    "manager_uuid",
    "version",
    "fs_location",
];

fn text_field(v: &Value, key: &'static str) -> Result<String, RecordError> {
    let f = v.dict_get(key).ok_or(RecordError::MissingKey { key })?;
    match f {
        // A version may have been written as a number.
        Value::Int(n) => Ok(n.to_string()),
        Value::Float(x) => Ok(x.to_string()),
        other => other.as_text().ok_or(RecordError::NotAString { key }),
    }
}

impl RepositoryRecord {
    /// Decodes one value of the `repository` database (key `id`).
    pub fn from_pickle(id: &[u8], value: &[u8]) -> Result<Self, RecordError> {
        let v = decode(value).map_err(RecordError::Pickle)?;
        Self::from_value(id, &v)
    }

    /// Reads a record from a decoded dict; a pickled object instance whose
    /// state is a dict (what `INST`/`OBJ`/`NEWOBJ` + `BUILD` make) counts
    /// as that dict.
    pub fn from_value(id: &[u8], v: &Value) -> Result<Self, RecordError> {
        let v = match v {
            Value::Object {
                state: Some(state), ..
            } if matches!(**state, Value::Dict(_)) => state,
            Value::Dict(_) => v,
            _ => return Err(RecordError::NotADict),
        };
        for key in REPOSITORY_KEYS {
            if v.dict_get(key).is_none() {
                return Err(RecordError::MissingKey { key });
            }
        }
        // The mount point is a path: keep its exact bytes.
        let mount = v
            .dict_get("mount_point")
            .and_then(Value::as_bytes)
            .ok_or(RecordError::NotAString { key: "mount_point" })?;
        use std::os::unix::ffi::OsStringExt;
        Ok(RepositoryRecord {
            id: bytes_to_text(id),
            mount_point: PathBuf::from(std::ffi::OsString::from_vec(mount)),
            filesystem: text_field(v, "filesystem")?,
            alias: text_field(v, "alias")?,
            manager_uuid: text_field(v, "manager_uuid")?,
            version: text_field(v, "version")?,
            fs_location: text_field(v, "fs_location")?,
        })
    }
}

/// The Manager's address from the `manager_ip` value of the `server`
/// database: a pickled string.
pub fn manager_ip_from_pickle(value: &[u8]) -> Result<String, RecordError> {
    let v = decode(value).map_err(RecordError::Pickle)?;
    v.as_text()
        .ok_or(RecordError::NotAString { key: "manager_ip" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_record_requires_every_key() {
        let full = "(dp0\nS'mount_point'\np1\nS'/OVS/Repositories/r1'\np2\nsS'filesystem'\n\
            S'ocfs2'\nsS'alias'\nS'it\\'s \"mine\" \\xe9'\nsS'manager_uuid'\nS'0004fb'\nsS'version'\n\
            S'3.0'\nsS'fs_location'\nS'/dev/mapper/x'\nsS'extra'\nI5\ns.";
        let r = RepositoryRecord::from_pickle(b"r1", full.as_bytes()).unwrap();
        assert_eq!(r.mount_point, PathBuf::from("/OVS/Repositories/r1"));
        assert_eq!(r.alias, "it's \"mine\" é");
        let missing = full.replace("S'alias'\n", "S'alias_'\n");
        assert_eq!(
            RepositoryRecord::from_pickle(b"r1", missing.as_bytes()),
            Err(RecordError::MissingKey { key: "alias" })
        );
        assert_eq!(
            RepositoryRecord::from_pickle(b"r1", b"N."),
            Err(RecordError::NotADict)
        );
        // The same dict as the state of an old-style instance (INST, BUILD).
        let inst = format!(
            "(iagent.repo\nRepository\np0\n{}b.",
            &full[..full.len() - 1]
        );
        let r2 = RepositoryRecord::from_pickle(b"r1", inst.as_bytes()).unwrap();
        assert_eq!(r2, r);
    }
}
