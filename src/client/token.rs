//! The token cache: a login's JWT kept for its lifetime, so that a script
//! logs in once and every later command reuses the token until its `exp`.
//!
//! One JSON file, `$XDG_CACHE_HOME/coriolis-ovm-exporter/tokens.json` (or
//! `~/.cache/...`), mode 0600 in a 0700 folder, one entry per server URL.
//! The token is a bearer credential: it is never printed, and the file is
//! replaced atomically so a crash never leaves half of it.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::error::{ClientError, Result};

/// A cached token is not reused in its last minute: a long command started
/// with it would fail half-way.
const EXP_MARGIN_SECS: u64 = 60;
/// Folder name under the cache root.
const CACHE_DIR: &str = "coriolis-ovm-exporter";
const CACHE_FILE: &str = "tokens.json";
/// Only the owner may read the tokens.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

/// One cached login.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub user: String,
    pub token: String,
    /// The token's `exp` claim (seconds since the epoch).
    pub exp: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    #[serde(default)]
    tokens: BTreeMap<String, Entry>,
}

/// The cache file.
pub struct TokenCache {
    path: PathBuf,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `exp` claim of a JWT, read without checking the signature (the
/// server checks it; the client only needs to know when to log in again).
pub fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_u64()
}

impl TokenCache {
    /// The default place: `$XDG_CACHE_HOME` or `$HOME/.cache`.
    pub fn default_location() -> Option<TokenCache> {
        let root = match std::env::var_os("XDG_CACHE_HOME") {
            Some(p) if Path::new(&p).is_absolute() => PathBuf::from(p),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
        };
        Some(TokenCache {
            path: root.join(CACHE_DIR).join(CACHE_FILE),
        })
    }

    pub fn at(path: PathBuf) -> TokenCache {
        TokenCache { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> CacheFile {
        // A missing or unreadable cache is an empty one: the worst case is
        // one more login.
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write(&self, file: &CacheFile) -> Result<()> {
        let local = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| ClientError::Local { what, path, source }
        };
        if let Some(dir) = self.path.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(local("cannot create the token cache folder", dir))?;
        }
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(file).map_err(|source| ClientError::Json {
            what: "token cache".to_owned(),
            source,
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(local("cannot write the token cache", &tmp))?;
        // The mode given at creation is cut by the umask, never widened;
        // set it exactly in case the file existed with a wider one.
        f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
            .and_then(|()| f.write_all(&bytes))
            .and_then(|()| f.sync_all())
            .map_err(local("cannot write the token cache", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(local("cannot write the token cache", &self.path))
    }

    /// A token for `base` still valid for at least a minute, of `user` when
    /// given.
    pub fn load(&self, base: &str, user: Option<&str>) -> Option<Entry> {
        let e = self.read().tokens.remove(base)?;
        if user.is_some_and(|u| u != e.user) {
            return None;
        }
        (e.exp > now_secs() + EXP_MARGIN_SECS).then_some(e)
    }

    /// Keeps `token` for `base`; its lifetime comes from its `exp` claim.
    pub fn store(&self, base: &str, user: &str, token: &str) -> Result<Entry> {
        let entry = Entry {
            user: user.to_owned(),
            token: token.to_owned(),
            exp: jwt_exp(token).unwrap_or(0),
        };
        let mut file = self.read();
        let now = now_secs();
        file.tokens.retain(|_, e| e.exp > now);
        file.tokens.insert(base.to_owned(), entry.clone());
        self.write(&file)?;
        Ok(entry)
    }

    /// Forgets the token of `base`; whether there was one.
    pub fn remove(&self, base: &str) -> Result<bool> {
        let mut file = self.read();
        let had = file.tokens.remove(base).is_some();
        if had {
            self.write(&file)?;
        }
        Ok(had)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
            e.encode(format!(r#"{{"user":"u","exp":{exp},"iss":"x"}}"#))
        )
    }

    #[test]
    fn exp_is_read_from_the_payload() {
        assert_eq!(jwt_exp(&jwt(1_900_000_000)), Some(1_900_000_000));
        assert_eq!(jwt_exp("garbage"), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
    }

    #[test]
    fn tokens_are_kept_private_and_until_exp() {
        let dir = std::env::temp_dir().join(format!("coe-token-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = TokenCache::at(dir.join("sub").join(CACHE_FILE));
        assert!(cache.load("https://h", None).is_none());
        let good = jwt(now_secs() + 3600);
        cache.store("https://h", "alice", &good).unwrap();
        cache
            .store("https://old", "bob", &jwt(now_secs() + 10))
            .unwrap();
        let mode = std::fs::metadata(cache.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, FILE_MODE);
        let dmode = std::fs::metadata(cache.path().parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, DIR_MODE);
        assert_eq!(cache.load("https://h", None).unwrap().token, good);
        assert_eq!(
            cache.load("https://h", Some("alice")).unwrap().user,
            "alice"
        );
        assert!(cache.load("https://h", Some("mallory")).is_none());
        // Within the last minute: not reused.
        assert!(cache.load("https://old", None).is_none());
        assert!(cache.remove("https://h").unwrap());
        assert!(cache.load("https://h", None).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
