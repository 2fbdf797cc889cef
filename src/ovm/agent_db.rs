//! ovs-agent's database folder: the names of its files, and the OVM
//! Manager's address its server database records.

use std::path::Path;

use super::agent_records;
use super::bdb;
use super::error::InventoryError;
use super::files::read_bounded;

/// File name of ovs-agent's repository database in its db folder.
pub const REPOSITORY_DB: &str = "repository";
/// File name of ovs-agent's server database in its db folder.
pub const SERVER_DB: &str = "server";
/// Key of the Manager's address in the server database.
pub const MANAGER_IP_KEY: &[u8] = b"manager_ip";
/// Largest ovs-agent database file read (they hold a few KiB to MiB).
pub const MAX_DB_FILE: u64 = 256 << 20;

/// The OVM Manager's address recorded by ovs-agent (`manager_ip` in
/// `<db_dir>/server`). `None` when the file or the key is absent (a node
/// not yet owned by a Manager).
pub fn manager_ip(db_dir: &Path) -> Result<Option<String>, InventoryError> {
    let path = db_dir.join(SERVER_DB);
    let bytes = match read_bounded(&path, MAX_DB_FILE) {
        Ok(b) => b,
        Err(InventoryError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let db = bdb::HashDb::open(&bytes).map_err(|source| InventoryError::Db {
        path: path.clone(),
        source,
    })?;
    let Some(value) = db
        .get(MANAGER_IP_KEY)
        .map_err(|source| InventoryError::Db {
            path: path.clone(),
            source,
        })?
    else {
        return Ok(None);
    };
    let ip =
        agent_records::manager_ip_from_pickle(&value).map_err(|source| InventoryError::Record {
            path,
            key: "manager_ip".into(),
            source,
        })?;
    let ip = ip.trim();
    Ok((!ip.is_empty()).then(|| ip.to_owned()))
}
