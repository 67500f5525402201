//! What commands need to go out through the egress relay: the proxy environment and the
//! proxy's CA in the sandbox's trust store. The agent writes the trust files itself, inside
//! the sandbox, where its own kernel resolves every path; the host never touches them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use cordon_api::agent::EgressConfig;
use cordon_api::tunnel::EGRESS_RELAY_PORT;
use cordon_api::RunConfig;

/// Cordon's files inside the sandbox (world-readable: every run user needs them).
pub const TRUST_DIR: &str = "/etc/cordon";
/// The proxy's CA alone (`NODE_EXTRA_CA_CERTS` adds it to Node's own roots).
pub const CA_PATH: &str = "/etc/cordon/egress-ca.pem";
/// The system roots plus the proxy's CA (`SSL_CERT_FILE` and friends replace the roots).
pub const BUNDLE_PATH: &str = "/etc/cordon/ca-bundle.pem";
/// The usual system bundle (Debian, Ubuntu, Alpine); the CA is appended when it exists, so
/// tools that ignore the environment trust it too.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Larger system bundles are not read (they are ~200 KiB); the sandbox controls this file.
const MAX_SYSTEM_BUNDLE_BYTES: u64 = 16 << 20;

/// Hosts that never go through the proxy: the sandbox's own loopback.
pub const NO_PROXY: &str = "localhost,127.0.0.1,::1";

/// Puts `ca_pem` in the sandbox's trust store: [`CA_PATH`], [`BUNDLE_PATH`], and appended to
/// [`SYSTEM_BUNDLE`] when that exists and does not hold it yet (so repeating is harmless).
pub fn install_trust(ca_pem: &str) -> io::Result<()> {
    let ca_pem = normalized(ca_pem);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(TRUST_DIR)?;
    write_atomically(Path::new(CA_PATH), ca_pem.as_bytes())?;
    let system = match read_bounded(Path::new(SYSTEM_BUNDLE)) {
        Ok(system) => Some(system),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => {
            tracing::warn!(%error, "cannot read {SYSTEM_BUNDLE}; the bundle has the proxy CA only");
            None
        }
    };
    let mut bundle = system.clone().unwrap_or_default();
    if !bundle.contains(ca_pem.trim()) {
        if !bundle.is_empty() && !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(&ca_pem);
    }
    if let Some(system) = system {
        if !system.contains(ca_pem.trim()) {
            append_to_system_bundle(&system, &ca_pem)?;
        }
    }
    write_atomically(Path::new(BUNDLE_PATH), bundle.as_bytes())
}

/// The environment layer of egress: under the sandbox's and the command's run_config (they
/// win), over the defaults. Rule `env_vars` sit over Cordon's own variables.
pub fn env_layer(egress: Option<&EgressConfig>) -> RunConfig {
    let Some(egress) = egress else {
        return RunConfig::default();
    };
    let proxy = format!("http://127.0.0.1:{EGRESS_RELAY_PORT}");
    let mut env = BTreeMap::new();
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.insert(name.to_string(), proxy.clone());
    }
    for name in ["NO_PROXY", "no_proxy"] {
        env.insert(name.to_string(), NO_PROXY.to_string());
    }
    for name in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "PIP_CERT",
    ] {
        env.insert(name.to_string(), BUNDLE_PATH.to_string());
    }
    env.insert("NODE_EXTRA_CA_CERTS".to_string(), CA_PATH.to_string());
    // Node 24+ honours HTTP(S)_PROXY for fetch and http with this set.
    env.insert("NODE_USE_ENV_PROXY".to_string(), "1".to_string());
    env.extend(egress.env_vars.clone());
    RunConfig {
        env_vars: Some(env),
        ..RunConfig::default()
    }
}

/// The PEM with exactly one trailing newline.
fn normalized(pem: &str) -> String {
    format!("{}\n", pem.trim())
}

fn read_bounded(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    fs::File::open(path)?
        .take(MAX_SYSTEM_BUNDLE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Replaces the system bundle with `system` + the CA, by rename, so a reader never sees half.
fn append_to_system_bundle(system: &str, ca_pem: &str) -> io::Result<()> {
    let mut text = system.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(ca_pem);
    // The bundle is often a symlink into /etc/ssl/certs or similar: write through it to its
    // target so the link keeps working.
    let target = fs::canonicalize(SYSTEM_BUNDLE)?;
    write_atomically(&target, text.as_bytes())
}

/// Writes `bytes` to `path` (mode 0644) through a temporary file in the same directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.cordon-{}", std::process::id()));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EgressConfig {
        EgressConfig {
            ca_pem: "-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----".into(),
            env_vars: [("AWS_ACCESS_KEY_ID".to_string(), "dummy".to_string())].into(),
        }
    }

    #[test]
    fn no_egress_adds_nothing() {
        assert_eq!(env_layer(None), RunConfig::default());
    }

    #[test]
    fn proxy_and_ca_variables_and_rule_env() {
        let env = env_layer(Some(&config())).env_vars.unwrap();
        assert_eq!(env["HTTPS_PROXY"], "http://127.0.0.1:15001");
        assert_eq!(env["http_proxy"], "http://127.0.0.1:15001");
        assert_eq!(env["no_proxy"], NO_PROXY);
        assert_eq!(env["SSL_CERT_FILE"], BUNDLE_PATH);
        assert_eq!(env["NODE_EXTRA_CA_CERTS"], CA_PATH);
        assert_eq!(env["AWS_ACCESS_KEY_ID"], "dummy");
    }

    #[test]
    fn the_user_run_config_wins() {
        let user = RunConfig {
            env_vars: Some([("HTTPS_PROXY".to_string(), "mine".to_string())].into()),
            ..RunConfig::default()
        };
        let merged = user.over(&env_layer(Some(&config())));
        assert_eq!(merged.env_vars.unwrap()["HTTPS_PROXY"], "mine");
    }
}
