//! The audit log (DESIGN §7): one JSON object per line, appended with a single write
//! before the response it records is sent. If a record cannot be written, the caller
//! refuses the access it would have recorded: no access without a record.
//!
//! HCNs appear only as `hcn_hmac`, an HMAC-SHA256 under a key that never leaves the
//! machine (a bare hash of a 10-digit number is reversed by trying them all).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aws_lc_rs::hmac;
use serde::Serialize;
use tracing::{error, warn};

use crate::config::AuditConfig;

/// The events DESIGN §7 names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Launch,
    Enter,
    Override,
    Disconnect,
    EmrLogout,
    EhrLogout,
    Deny,
    /// An admin action (`POST /admin/*`), with who took it in `detail`.
    Admin,
}

/// One audit record; absent fields are written as `null`, so every line has every field.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub ts: String,
    pub event: Event,
    pub user: Option<String>,
    pub uao: Option<String>,
    pub demographic_no: Option<String>,
    pub hcn_hmac: Option<String>,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub result: String,
    pub detail: Option<String>,
}

impl Record {
    pub fn new(event: Event, result: &str) -> Self {
        Self {
            ts: now_rfc3339(),
            event,
            user: None,
            uao: None,
            demographic_no: None,
            hcn_hmac: None,
            reason: None,
            request_id: None,
            result: result.into(),
            detail: None,
        }
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn uao(mut self, uao: &str) -> Self {
        self.uao = Some(uao.into());
        self
    }

    pub fn patient(mut self, demographic_no: &str, hcn_hmac: Option<String>) -> Self {
        self.demographic_no = Some(demographic_no.into());
        self.hcn_hmac = hcn_hmac;
        self
    }

    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn request_id(mut self, id: &str) -> Self {
        self.request_id = Some(id.into());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
#[error("audit log {path} cannot be written: {source}")]
pub struct AuditError {
    path: String,
    source: std::io::Error,
}

pub struct AuditLog {
    path: PathBuf,
    file: Mutex<Option<File>>,
    /// `None` when no key could be had: then no record can be written either.
    hmac: Option<hmac::Key>,
}

/// File name of the generated HMAC key, beside the audit log.
const KEY_FILE: &str = "hcn-hmac.key";

impl AuditLog {
    /// Opens the log. A log that cannot be opened now is retried at each record, and
    /// each failure refuses the access it would have recorded.
    pub fn open(config: &AuditConfig) -> Self {
        let hmac = match hash_key(config) {
            Ok(key) => Some(hmac::Key::new(hmac::HMAC_SHA256, &key)),
            Err(e) => {
                error!(error = %e, "no audit HMAC key: launches will be refused until it can be created");
                None
            }
        };
        let log = Self {
            path: config.path.clone(),
            file: Mutex::new(None),
            hmac,
        };
        if let Err(e) = log.reopen() {
            error!(error = %e, "audit log unavailable: launches will be refused until it can be written");
        }
        log
    }

    fn reopen(&self) -> Result<(), AuditError> {
        let file = open_append(&self.path).map_err(|source| self.error(source))?;
        *self.file.lock().expect("audit lock") = Some(file);
        Ok(())
    }

    fn error(&self, source: std::io::Error) -> AuditError {
        AuditError {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// HMAC-SHA256 of an HCN, hex, as `hcn_hmac` is written.
    pub fn hcn_hmac(&self, hcn: &str) -> Option<String> {
        self.hcn_tag(hcn).map(|t| hex(&t))
    }

    /// HMAC-SHA256 of an HCN, raw.
    pub fn hcn_tag(&self, hcn: &str) -> Option<[u8; 32]> {
        let tag = hmac::sign(self.hmac.as_ref()?, hcn.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        Some(out)
    }

    /// Appends one record with one write. Returns only once the line is with the
    /// operating system.
    pub fn record(&self, record: &Record) -> Result<(), AuditError> {
        if self.hmac.is_none() {
            return Err(self.error(std::io::Error::other("no HMAC key for hcn_hmac")));
        }
        let mut line = serde_json::to_vec(record).map_err(|e| self.error(e.into()))?;
        line.push(b'\n');
        let mut guard = self.file.lock().expect("audit lock");
        if guard.is_none() {
            *guard = Some(open_append(&self.path).map_err(|e| self.error(e))?);
        }
        let file = guard.as_mut().expect("just opened");
        if let Err(e) = file.write_all(&line).and_then(|_| file.flush()) {
            // Reopen next time: the file may have been rotated away or the disk freed.
            *guard = None;
            warn!(error = %e, event = ?record.event, "audit record not written");
            return Err(self.error(e));
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// The configured key, or the one kept beside the log (created once, mode 0600).
fn hash_key(config: &AuditConfig) -> std::io::Result<Vec<u8>> {
    if !config.hash_key.is_empty() {
        return Ok(config.hash_key.as_bytes().to_vec());
    }
    let dir = config
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let key_path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&key_path) {
        Ok(hex) if hex.trim().len() >= 64 => return Ok(hex.trim().as_bytes().to_vec()),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} is too short to be a key; remove it to have a new one made",
                key_path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| std::io::Error::other("system RNG failed"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(&key_path) {
        Ok(mut f) => {
            f.write_all(hex.as_bytes())?;
            f.sync_all()?;
            Ok(hex.into_bytes())
        }
        // Another process made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(&key_path)?
                .trim()
                .as_bytes()
                .to_vec())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> AuditConfig {
        AuditConfig {
            path: dir.join("audit/a.jsonl"),
            hash_key: String::new(),
        }
    }

    #[test]
    fn records_are_json_lines_with_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&config(dir.path()));
        let hmac = log.hcn_hmac("9876543217").unwrap();
        log.record(
            &Record::new(Event::Launch, "ok")
                .user("999998")
                .patient("1001", Some(hmac.clone())),
        )
        .unwrap();
        log.record(&Record::new(Event::Deny, "refused").detail("hcn_invalid"))
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("audit/a.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "launch");
        assert_eq!(lines[0]["hcn_hmac"], hmac);
        assert_eq!(lines[1]["event"], "deny");
        for key in [
            "ts",
            "event",
            "user",
            "uao",
            "demographic_no",
            "hcn_hmac",
            "reason",
            "request_id",
            "result",
            "detail",
        ] {
            assert!(lines[1].get(key).is_some(), "{key} missing");
        }
        assert!(!text.contains("9876543217"), "never the raw HCN");
    }

    #[test]
    fn hmac_key_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = AuditLog::open(&config(dir.path())).hcn_hmac("9876543217");
        let b = AuditLog::open(&config(dir.path())).hcn_hmac("9876543217");
        assert_eq!(a, b);
        let plain = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"9876543217");
        let plain: String = plain.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_ne!(a.unwrap(), plain, "not a bare hash");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("audit").join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
        }
    }

    #[test]
    fn unwritable_log_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let log = AuditLog::open(&AuditConfig {
            path: blocker.join("a.jsonl"),
            hash_key: "k".repeat(32),
        });
        assert!(log.record(&Record::new(Event::Launch, "ok")).is_err());
    }
}
